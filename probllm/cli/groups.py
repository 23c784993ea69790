"""Options as data: each group of options (backend, generation, eval, dpo) is defined once, as a list of `Opt`,
and `uses(GROUP, ...)` turns it into Typer options on every command that takes it.

A command declares one parameter per group (e.g. `generation: dict`); it receives that group's values as one
dict, so the library call is `Function(**generation)` rather than a dozen names repeated three times. Every
command using groups also takes `--config FILE`: a YAML mapping of option names (dashes or underscores) to
values, used for options not given on the command line (flags win). Values from the file go through the same
click conversion as flags, so choices and ranges are checked the same way, with the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from probllm.io import EXIT_USAGE, UsageError, log
from probllm.io import read_config as read_config_file

_UNSET = object()


@dataclass(frozen=True)
class Opt:
    """One option: its Python/YAML name, type, default, help and (optionally) its flags and click settings."""

    name: str
    type: Any
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)  # extra typer.Option arguments: min=, show_default=, hidden=

    def parameter(self) -> inspect.Parameter:
        flags = self.flags or ("--" + self.name.replace("_", "-"),)
        option = typer.Option(*flags, help=self.help, **self.settings)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=self.default,
                                 annotation=Annotated[self.type, option])


@dataclass(frozen=True)
class OptionGroup:
    """A named list of options that several commands share (each may change defaults or leave some out)."""

    name: str
    options: tuple[Opt, ...]

    def names(self) -> list[str]:
        return [o.name for o in self.options]

    def replace(self, name: str, **changes: Any) -> "OptionGroup":
        assert name in self.names(), f"{self.name} has no option {name}"
        return dataclasses.replace(self, options=tuple(
            dataclasses.replace(o, **changes) if o.name == name else o for o in self.options))

    def only(self, *names: str) -> "OptionGroup":
        return dataclasses.replace(self, options=tuple(o for o in self.options if o.name in names))

    def without(self, *names: str) -> "OptionGroup":
        return dataclasses.replace(self, options=tuple(o for o in self.options if o.name not in names))


def _usage_error(ctx, message: str) -> None:
    log(f"{ctx.command_path}: error: {message} (see {ctx.command_path} --help)")
    raise typer.Exit(EXIT_USAGE)


def read_config(path: Path, ctx) -> dict:
    """`--config`'s values (probllm.io.read_config), a bad file reported as this command's usage error."""
    try:
        return read_config_file(path)
    except UsageError as e:
        _usage_error(ctx, str(e))


ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="YAML file of option values (names as the flags, dashes or underscores); flags given on "
                     "the command line win.", show_default=False)]


def uses(*groups: OptionGroup, config: bool = True) -> Callable:
    """Give a command every option of `groups` (and `--config`); it receives each group as a dict named after the
    group. Options of the command's own signature can be set from `--config` too."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn, eval_str=True)
        group_names = {g.name for g in groups}
        missing = group_names - set(signature.parameters)
        assert not missing, f"{fn.__name__} needs a parameter per group: {missing}"
        own = [p for p in signature.parameters.values() if p.name not in group_names]
        added = [o.parameter() for g in groups for o in g.options]
        extra = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigFile)] \
            if config else []
        ctx_param = inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        parameters = own + added + extra + [ctx_param]
        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            ctx = kwargs.pop("_ctx")
            config_file = kwargs.pop("config", None) if config else None
            if config_file is not None:
                _apply_config(ctx, kwargs, read_config(config_file, ctx), config_file)
            for g in groups:
                kwargs[g.name] = {name: kwargs.pop(name) for name in g.names()}
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        del command.__wrapped__  # Typer must see the new signature, not the function's own
        return command

    return decorate


def _config_key(param) -> str:
    """The name an option has in a config file: its long flag without dashes (`ops-per-record`), the same
    name the user types; underscores work too."""
    longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return (longs[0][2:] if longs else param.name).replace("-", "_")


def _apply_config(ctx, kwargs: dict, values: dict, path: Path) -> None:
    """Fill options left at their defaults from the config file, converted and checked by their click types."""
    options = {_config_key(p): p for p in ctx.command.params
               if getattr(p, "param_type_name", "") == "option" and p.name not in ("config", "help")}
    for key, raw in values.items():
        param = options.get(key)
        if param is None:
            known = ", ".join(sorted(k.replace("_", "-") for k in options))
            _usage_error(ctx, f"--config {path}: unknown option '{key.replace('_', '-')}' (known: {known})")
        source = ctx.get_parameter_source(param.name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            continue  # given on the command line: the flag wins
        try:
            kwargs[param.name] = param.process_value(ctx, raw)
        except Exception as e:  # click's BadParameter and friends: the same message a flag would get
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            _usage_error(ctx, f"--config {path}: {key.replace('_', '-')}: {message}")
