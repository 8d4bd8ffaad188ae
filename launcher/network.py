"""Which network interface reaches the main process: set GLOO/NCCL_SOCKET_IFNAME for the user.

Without it each host may advertise 127.0.0.1 and the process group fails to connect
("connectFullMesh ... remote=[127.0.0.1]", ../shared/NOTES.md), the classic multi-node
misconfiguration. The interface is the one the kernel routes the main address through.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)
_SIOCGIFADDR = 0x8915
SOCKET_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def local_address_towards(addr: str, port: int = 29500) -> str:
    """The local IPv4 address the kernel would use to reach ``addr`` (no packet is sent)."""
    target = socket.gethostbyname(addr)
    if ipaddress.ip_address(target).is_loopback:
        return target
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((target, port))  # UDP connect only picks a route
        return s.getsockname()[0]


def interface_address(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None  # no IPv4 address on this interface
    return socket.inet_ntoa(packed[20:24])


def interface_towards(addr: str) -> str | None:
    """The name of the interface that reaches ``addr``, or None if it cannot be found."""
    try:
        local = local_address_towards(addr)
    except OSError as exc:
        log.warning("cannot find a route to %s: %s", addr, exc)
        return None
    if ipaddress.ip_address(local).is_loopback:
        return "lo"
    for _, name in socket.if_nameindex():
        if interface_address(name) == local:
            return name
    return None


def socket_env(main_addr: str) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME for reaching ``main_addr``, unless the user
    set them already (theirs win)."""
    if all(var in os.environ for var in SOCKET_VARS):
        return {}
    name = interface_towards(main_addr)
    if name is None:
        log.warning(
            "no interface found towards %s; set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME", main_addr
        )
        return {}
    return {var: name for var in SOCKET_VARS if var not in os.environ}
