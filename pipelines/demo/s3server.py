"""A local S3 endpoint for ``rayseg demo --s3``: moto's server on 127.0.0.1, with the AWS
variables pointing at it while it runs."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from pipelines.storage import S3_ENV


@contextlib.contextmanager
def local_s3_server(credentials: str = "local") -> Iterator[str]:
    """moto's S3 server on 127.0.0.1:<free port>; yields its endpoint URL.

    While it runs, the AWS variables point at it (endpoint, dummy ``credentials``, a region,
    no instance metadata), so :func:`resolve_options` and every Ray worker started afterwards
    use it; they are restored when it stops.  moto is a test dependency, so this is not for
    production paths.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with aws_env_for(endpoint, credentials):
            yield endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def aws_env_for(endpoint: str, credentials: str) -> Iterator[None]:
    """The AWS variables pointed at ``endpoint`` (dummy ``credentials``, a region, no instance
    metadata, no session token) for the block; every one of :data:`S3_ENV` is restored after."""
    saved = {name: os.environ.get(name) for name in S3_ENV}
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):   # the first would win over
        os.environ.pop(name, None)                               # AWS_ENDPOINT_URL
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=credentials,
                      AWS_SECRET_ACCESS_KEY=credentials, AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
