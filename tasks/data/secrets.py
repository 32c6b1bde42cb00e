"""PhysioNet credentials, from environment variables or a Prefect Secret block. A password is never shown."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tasks.config import PhysioNetSource


class CredentialsError(ValueError):
    """No usable credentials; the message names where they were looked for, never a value."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)  # repr (and so str, tracebacks with locals, logs) leaves it out


def parse_secret_value(value: object, block_name: str) -> Credentials:
    """Credentials from a Secret block's value, 'username:password' (the password may itself contain ':')."""
    if not isinstance(value, str):
        raise CredentialsError(f"Prefect Secret block {block_name!r} must hold a 'username:password' string, "
                               f"not a {type(value).__name__}")
    username, sep, password = value.partition(":")
    if not sep or not username or not password:
        raise CredentialsError(f"Prefect Secret block {block_name!r} must hold 'username:password'")
    return Credentials(username, password)


def resolve_credentials(source_cfg: PhysioNetSource) -> Credentials:
    """The configured Secret block if one is named, otherwise the environment variables the config names."""
    if source_cfg.secret_block:
        from prefect.blocks.system import Secret  # imported here: loading it pulls in Prefect's client

        try:
            value = Secret.load(source_cfg.secret_block).get()
        except ValueError as err:  # Prefect's "Unable to find block document named ..."
            raise CredentialsError(f"cannot load Prefect Secret block {source_cfg.secret_block!r}: {err}") from None
        return parse_secret_value(value, source_cfg.secret_block)
    username = os.environ.get(source_cfg.username_env, "")
    password = os.environ.get(source_cfg.password_env, "")
    missing = [name for name, value in ((source_cfg.username_env, username), (source_cfg.password_env, password))
               if not value]
    if missing:
        raise CredentialsError(f"PhysioNet credentials missing: set the environment variable(s) {', '.join(missing)}, "
                               "or name a Prefect Secret block holding 'username:password' in source.secret_block")
    return Credentials(username, password)
