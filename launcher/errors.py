"""The one base class for problems with the user's input (config, data, tokenizer files)."""


class UserError(ValueError):
    """Bad input, reported by the CLI as one clear message without a traceback."""
