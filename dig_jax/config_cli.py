"""Command-line parsing for programs configured by an ml_collections config file (`--config file.py[:arg]` plus
`--config.<key>=<value>` overrides): a file, key or value that does not parse ends the program with one
`error:` line naming it (exit 2) instead of a traceback.

    app.run(main, flags_parser=parse_config_flags)
"""

import re
import sys

from absl import flags
from ml_collections import ConfigDict

_OVERRIDE = re.compile(r"--config\.([\w.]+)")
_FILE_ERROR = "Error whilst parsing config file:"


def exit_with_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing of `argv` (app.run's flags_parser), with the errors of the --config flag reported."""
    try:
        remaining = flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:  # an override of a key the config does not have
        exit_with_error(unknown_override(argv, _load_config(argv)) or str(error))
    except flags.IllegalFlagValueError as error:  # get_config() raised, or an override's value has the wrong type
        exit_with_error(_illegal_value(str(error), argv))
    if not isinstance(flags.FLAGS["config"].value, ConfigDict):  # a file that cannot be read fails only when used
        exit_with_error(f"--config={_config_argument(argv)}: no such config file (a Python file with get_config(), "
                        "e.g. configs/quickstart.py)")
    return remaining


def unknown_override(argv: list[str], config: ConfigDict) -> str | None:
    """'--config.<path>: config.<parent> has no key ...' for the first override whose key `config` lacks."""
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if match:
            found, parent, key = _lookup(config, match.group(1))
            if not found:
                parent_name = key.rsplit(".", 1)[0]
                if not isinstance(parent, ConfigDict):
                    return (f"--config.{match.group(1)}: {parent_name} is a value of type {type(parent).__name__}, "
                            "not a group of keys")
                return f"--config.{match.group(1)}: {key} is not a config key; {parent_name} has {', '.join(parent)}"
    return None


def _lookup(config: ConfigDict, path: str):
    """(found, the value or the last node reached, the dotted name of the key looked up last) for `path`."""
    node, name = config, "config"
    for key in path.split("."):
        name = f"{name}.{key}"
        if not isinstance(node, ConfigDict) or key not in node:
            return False, node, name
        node = node[key]
    return True, node, name


def _config_argument(argv: list[str]) -> str:
    """The value given to --config (`--config X` or `--config=X`; the last one counts, as in absl)."""
    value = ""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg[len("--config="):]
    return value


def _load_config(argv: list[str]) -> ConfigDict:
    """The config the --config file gives, without overrides (absl resets the flag when parsing fails)."""
    return flags.FLAGS["config"].parser.parse(_config_argument(argv))


def _illegal_value(message: str, argv: list[str]) -> str:
    lines = message.strip().splitlines()
    if _FILE_ERROR in lines[0]:  # absl appends the loader's traceback: its last line is the exception get_config raised
        return f"--config={_config_argument(argv)}: {lines[-1]}"
    match = _OVERRIDE.search(lines[0])
    if match:  # "flag --config.key=value: <the parser's complaint>"
        _, value, name = _lookup(_load_config(argv), match.group(1))
        return f"{lines[0].removeprefix('flag ')} ({name} must be of type {type(value).__name__})"
    return lines[0].removeprefix("flag ")
