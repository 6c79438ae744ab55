"""Checks `cnnflow mlflow-server` makes before it starts `mlflow server`, so that a wrong
store, bucket or auth config is one line and a non-zero exit instead of a server that
boots and fails on the first request.

- `postgresql://USER[:PASSWORD]@HOST:PORT/DB`: one connection (psycopg2, libpq: a password
  missing from the URI comes from PGPASSWORD or ~/.pgpass; host, port and user may come
  from PGHOST, PGPORT, PGUSER). Unreachable, wrong password and missing database are
  told apart. The password never appears in a message.
- `s3://BUCKET/PREFIX`: HeadBucket on the endpoint MLflow will use (MLFLOW_S3_ENDPOINT_URL,
  else AWS_ENDPOINT_URL, else AWS), with the credentials boto3 finds.
- `--auth CONFIG`: the file exists and has MLflow's `[mlflow]` section; a PostgreSQL
  `database_uri` in it is checked like the store.
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path

from cnnflow.errors import CnnflowError

POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2", "postgres")


def is_postgres(uri: str) -> bool:
    return uri.split("://", 1)[0] in POSTGRES_SCHEMES if "://" in uri else False


def redact(uri: str) -> str:
    """The URI with its password (if any) replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URI: show no part of it after '@'
        return uri.split("://", 1)[0] + "://..."


def _connect_args(uri: str) -> dict:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except ArgumentError as exc:
        raise CnnflowError(f"{redact(uri)}: not a database URI ({exc})") from None
    args = url.translate_connect_args(username="user", database="dbname")
    args.update({k: v if isinstance(v, str) else v[-1] for k, v in url.query.items()})
    return args


def check_postgres(uri: str, what: str = "--store", timeout_s: int = 10) -> None:
    """Connect once to the PostgreSQL database `uri` names; a CnnflowError saying why not."""
    import psycopg2

    args = _connect_args(uri)
    where = f"{args.get('host') or os.environ.get('PGHOST', 'localhost')}:" \
            f"{args.get('port') or os.environ.get('PGPORT', 5432)}"
    user = args.get("user") or os.environ.get("PGUSER", "")
    try:
        psycopg2.connect(connect_timeout=timeout_s, **args).close()
    except psycopg2.OperationalError as exc:
        text = str(exc).strip()
        detail = text.split("failed:", 1)[-1].strip().splitlines()[0]
        if "password authentication failed" in text or "no password supplied" in text:
            raise CnnflowError(f"{what} {redact(uri)}: PostgreSQL at {where} refused the "
                               f"password for user {user!r} (give it in the URI or in "
                               f"PGPASSWORD)") from None
        if "does not exist" in text:
            raise CnnflowError(f"{what} {redact(uri)}: {detail.removeprefix('FATAL:').strip()}"
                               f" on PostgreSQL at {where} (create it first)") from None
        raise CnnflowError(f"{what} {redact(uri)}: PostgreSQL at {where} is unreachable: "
                           f"{detail}") from None


def s3_endpoint() -> str | None:
    return os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")


def check_bucket(uri: str, what: str = "--artifacts") -> None:
    """HeadBucket on the bucket of `s3://BUCKET/PREFIX`; a CnnflowError saying why not."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    endpoint = s3_endpoint()
    at = endpoint or "AWS S3"
    if not bucket:
        raise CnnflowError(f"{what} {uri}: expected s3://BUCKET/PREFIX")
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(
        connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise CnnflowError(f"{what} {uri}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                           f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise CnnflowError(f"{what} {uri}: bucket {bucket!r} does not exist at {at} "
                               f"(create it first)") from None
        if code in ("403", "AccessDenied"):
            raise CnnflowError(f"{what} {uri}: access to bucket {bucket!r} at {at} denied "
                               f"for these credentials") from None
        raise CnnflowError(f"{what} {uri}: bucket {bucket!r} at {at}: {exc}") from None
    except BotoCoreError as exc:
        raise CnnflowError(f"{what} {uri}: cannot reach {at}: {exc}") from None


def check_auth_config(path: str | Path) -> Path:
    """The absolute path of an MLflow basic-auth config that has its `[mlflow]` section."""
    config = Path(path).resolve()
    if not config.is_file():
        raise CnnflowError(f"--auth {path}: no such file (expected MLflow's basic_auth.ini)")
    parser = configparser.ConfigParser()
    try:
        parser.read(config)
    except configparser.Error as exc:
        raise CnnflowError(f"--auth {path}: not an INI file: "
                           f"{str(exc).splitlines()[0]}") from None
    for key in ("default_permission", "database_uri"):
        if not parser.has_option("mlflow", key):
            raise CnnflowError(f"--auth {path}: expected [mlflow] {key} = ... "
                               f"(MLflow's basic_auth.ini)")
    database = parser.get("mlflow", "database_uri")
    if database.split("://", 1)[0] in ("postgresql", "postgres"):
        raise CnnflowError(f"--auth {path}: database_uri {redact(database)}: write "
                           f"postgresql+psycopg2:// (the driver installed; SQLAlchemy's "
                           f"default for postgresql:// is psycopg 3)")
    if is_postgres(database):
        check_postgres(database, what=f"--auth {path}: database_uri")
    return config
