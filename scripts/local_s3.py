"""A local S3 endpoint (moto server, from the `dev` extra) for trying `checkpoint=s3` without a cloud.

    python scripts/local_s3.py                       # serves on 127.0.0.1:9000, prints the variables to export
    python scripts/local_s3.py --run -- sae-dist checkpoint=s3 checkpoint.url=s3://sae-dist/runs
    python scripts/local_s3.py --port 9100 --bucket ckpt --run -- python scripts/export_sae.py s3://ckpt/... out

With --run, the command runs with the AWS variables pointing at the endpoint and the server stops when it
exits (its exit status is this script's). Everything lives in memory: stopping the server drops the data.
The credentials are moto's dummies, never real ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading


def endpoint_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point boto3 / s3fs (and so checkpoint=s3) at `endpoint`."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def start(host: str, port: int, buckets: list[str]):  # type: ignore[no-untyped-def]
    """Starts moto's S3 server in this process and creates `buckets`; returns the server (`.stop()`)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    endpoint = f"http://{host}:{port}"
    os.environ.update(endpoint_env(endpoint))
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for bucket in buckets:
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    return server


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--bucket", action="append", help="bucket to create (repeatable; default: sae-dist)")
    ap.add_argument("--run", action="store_true", help="run the command after `--` against the endpoint, then stop")
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: len(argv) - len(command) - (1 if command else 0)])
    if args.run != bool(command):
        ap.error("--run needs a command after `--` (and a command needs --run)")
    buckets = args.bucket or ["sae-dist"]
    server = start(args.host, args.port, buckets)
    endpoint = f"http://{args.host}:{args.port}"
    try:
        if command:
            return subprocess.call(command, env=os.environ | endpoint_env(endpoint))
        print(f"S3 endpoint {endpoint} with bucket(s) {', '.join(buckets)}. In another shell:")
        print("  export " + " ".join(f"{k}={v}" for k, v in endpoint_env(endpoint).items()))
        print(f"  sae-dist checkpoint=s3 checkpoint.url=s3://{buckets[0]}/runs")
        print("Ctrl-C stops the server (and drops its data).")
        threading.Event().wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
