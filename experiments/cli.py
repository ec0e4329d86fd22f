"""How the experiment scripts start: `cli.run(main)` instead of `app.run(main)`.

- A user's mistake is one line on stderr and exit status 2: a `--config.*` override naming no field of the config,
  a flag value of the wrong type, or any `dsjax.errors.UserError` raised by the run (bad config field, file,
  checkpoint). Other exceptions keep their traceback: they are bugs.
- Logs are quiet by default: absl / Orbax / JAX INFO and WARNING lines are hidden unless `--verbosity` asks (e.g.
  `--verbosity=0`); the scripts' own progress lines are plain prints and always show.
Defines no flags.
"""

from __future__ import annotations

import contextlib
import sys

from absl import app, flags, logging

from dsjax.errors import UserError, report_user_errors


def _config_override(argv: list[str], error: Exception) -> str:
    """The command-line override an ml_collections error is about (it names only the missing key)."""
    key = str(error).strip("\"' ")
    hits = [a.split("=")[0] for a in argv[1:] if a.startswith("--config") and key and key in a.split("=")[0]]
    return hits[0] if hits else "a --config.* override"


@contextlib.contextmanager
def config_errors():
    """Around a script's config_flags.DEFINE_config_file (locked: an override must name an existing field).
    ml_collections applies the command line's overrides while it defines the flag, so a bad one fails there, at
    import: one line, exit 2. (The flag is defined in the script itself so that its --help lists it.)"""
    try:
        yield
    except (AttributeError, KeyError) as e:
        _fail(f"{_config_override(sys.argv, e)} names no field of the config (see --help and the config file)")
    except (TypeError, ValueError) as e:
        _fail(str(e) if isinstance(e, UserError) else f"{_config_override(sys.argv, e)}: {e}")


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _parse(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, UserError) as e:  # a bad flag value, or a config file that refused an override
        message = str(e)
    except (AttributeError, KeyError) as e:  # ml_collections: the override names no field of the config
        message = f"{_config_override(argv, e)} names no field of the config (see --help and the config file)"
    except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type for its field
        message = f"{_config_override(argv, e)}: {e}"
    _fail(message)


def run(main) -> None:
    """app.run(main) with one-line user errors (exit 2) and quiet library logs (see the module docstring)."""

    def quiet_main(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.ERROR)
        with report_user_errors():
            return main(argv)

    app.run(quiet_main, flags_parser=_parse)
