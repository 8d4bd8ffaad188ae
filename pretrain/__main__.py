"""`python -m pretrain CONFIG [key=value ...]`, also each worker of
`accelerate launch --config_file configs/accelerate/zero3.yaml -m pretrain CONFIG`."""

import sys

from launcher.cli import main

raise SystemExit(main(["pretrain", *sys.argv[1:]]))
