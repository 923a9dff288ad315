"""``rayseg serve``: Serve YAML + flags -> pipelines.serve.app.start_endpoint -> URL, until Ctrl-C."""
from __future__ import annotations

import argparse
import typing

from jobs.options import add_config_options, add_engine_option, resolve_config_path

DESCRIPTION = """\
Online segmentation on Ray Serve.  Deploys the model artifact behind an HTTP endpoint, prints its
URL and a curl example, and serves until Ctrl-C; then the replicas drain and flush their rows.

  POST /v1/segment   an image (raw body or multipart; PNG, JPEG, BMP, GIF, TIFF).  JSON answer:
                     base64 mask PNG, per-class areas, mean confidence, model version, timing.
                     `Accept: image/png` answers the mask PNG; ?confidence=true adds the
                     confidence map.  Too large: 413; not an image / undecodable: 415 / 422.
  POST /v1/explain   ?class=NAME&method=gradcam|occlusion|integrated_gradients: why the model
                     put the class there, an attribution map PNG at the image's size
  GET  /v1/model     the artifact's metadata and the serving settings
  GET  /healthz      liveness
  /v2/...            the Open Inference Protocol (KServe V2 REST, binary tensor data), for
                     Triton / KServe clients: POST /v2/models/<name>/infer takes IMAGE (BYTES
                     encoded images, or UINT8 pixels) and answers MASK, CLASS_PIXEL_COUNTS,
                     IMAGE_SIZE and, when named, CONFIDENCE; GET /v2, /v2/models/<name>,
                     /v2/health/live, /v2/health/ready (README "Calling the endpoint")

Replicas autoscale between min and max (num_replicas: auto), batch requests (max_batch_size,
batch_wait_timeout_s), and append every answered request to Parquet under
<out>/date=YYYY-MM-DD/, flushed by row count or age and again at shutdown.  All of this is set in
the Serve config (--config, `serve build` format; default jobs/configs/serve.yaml), the same
application that infra/rayservice.yaml deploys on Kubernetes; --set changes one of its keys.

Speed: the forward runs on OpenVINO on CPUs (--engine; ONNX Runtime for lite U-Nets, torch on
GPUs).  When this command starts Ray itself and `haproxy` is on PATH, Ray Serve's HAProxy
ingress sends requests straight to the replicas (about half the latency of the default proxy
actor; RAY_SERVE_ENABLE_HA_PROXY=0 turns it off, and replicas then stop listening on ports
30000-31000).
"""

EPILOG = """\
examples:
  rayseg serve --model rayseg_work/models/unet/v1
  rayseg serve --model s3://bucket/models/unet/v1 --out s3://bucket/serve-preds --port 8080
  rayseg serve --model rayseg_work/models/unet/v1 \
      --set applications.0.deployments.0.autoscaling_config.max_replicas=8
  RAYSEG_API_KEY=... rayseg serve --model rayseg_work/models/unet/v1 --api-key-env RAYSEG_API_KEY
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from seg_core.config import InstanceMethod

    parser = subparsers.add_parser(
        "serve", help="real-time endpoint on Ray Serve (autoscaling, batching, Parquet log)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model artifact directory (local or s3://), or a registry URI: "
                             "models:/name@champion (promote --serve-app moves it), models:/name/N")
    add_config_options(parser, "a Serve config in `serve build` format (default: serve, i.e. "
                               "jobs/configs/serve.yaml); --set addresses its keys, e.g. "
                               "applications.0.args.flush_rows=64")
    parser.add_argument("--out", help="Parquet prefix for answered requests (local or s3://)")
    parser.add_argument("--host", help="bind address (default from the config: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default from the config: 8000)")
    add_engine_option(parser)
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="require the key held in environment variable VAR (X-API-Key header)")
    parser.add_argument("--instances", choices=typing.get_args(InstanceMethod),
                        help="cut each mask into objects; answers gain objects {count, table} "
                             "and instance_png (default none)")
    return parser


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipelines.config import apply_overrides, read_yaml
    from pipelines.raycluster import check_shared, ensure_ray
    from pipelines.serve.app import start_endpoint, stop_endpoint

    config = apply_overrides(read_yaml(resolve_config_path(args.config or "serve")),
                             args.overrides)
    ensure_ray()
    args_block = config["applications"][0].get("args") or {}
    check_shared({"--model": args.model, "--out": args.out or args_block.get("out_uri")})
    url = start_endpoint(args.model, args.out, config=config, host=args.host,
                         port=args.port, api_key_env=args.api_key_env,
                         args={key: value for key, value in (("engine", args.engine),
                                                             ("instances", args.instances))
                               if value} or None)
    key = f" -H \"X-API-Key: ${args.api_key_env}\"" if args.api_key_env else ""
    print(f"rayseg serve: listening on {url}  (Ctrl-C stops and flushes)\n"
          f"  page: {url}/  (drop an image to see its mask; the API key is typed in there)\n"
          f"  curl -s{key} --data-binary @image.png -H 'Accept: image/png' "
          f"{url}/v1/segment -o mask.png\n"
          f"  curl -s{key} -F image=@image.jpg '{url}/v1/segment?confidence=true'\n"
          f"  Open Inference Protocol (Triton / KServe clients): {url}/v2/models/<name>/infer",
          flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):  # a timeout keeps the main thread responsive to signals
        pass
    print("rayseg serve: stopping (replicas drain and flush their Parquet rows) ...", flush=True)
    stop_endpoint()
    return 0
