"""``python -m llmsys.rank sample|serve|stats``: the ranking loop from the command line.

::

    python -m llmsys.rank sample --model outputs/sft-tiny-chat/final --prompts prompts.txt --k 4 --out candidates.jsonl
    python -m llmsys.rank serve --candidates candidates.jsonl --out rankings.jsonl
    python -m llmsys.rank serve --model outputs/sft-tiny-chat/final --prompts prompts.txt --k 4 --out rankings.jsonl
    python -m llmsys.rank stats rankings.jsonl
    python -m llmsys.train stage=reward data=files data.path=rankings.jsonl model.init_from=outputs/sft-tiny-chat/final

``serve --model`` samples at start-up into ``<out>.candidates`` and reuses that file on a restart (so item
ids stay the same); ``--compare <pipeline out>/side_by_side.json`` adds the stages-side-by-side page.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import socket
import sys
from pathlib import Path

from llmsys.data import DataError
from llmsys.rank.app import LOOPBACK_NAMES, create_app
from llmsys.rank.candidates import (
    Item,
    Sampling,
    read_candidates,
    read_prompts,
    sample_items,
    write_candidates,
)
from llmsys.rank.compare import CompareError, read_side_by_side
from llmsys.rank.stats import format_stats, ranking_stats
from llmsys.rank.store import RankingStore, StoreError, side_file

logger = logging.getLogger("llmsys.rank")

DEFAULT_PORT = 8765
TOKEN_ENV = "LLMSYS_RANK_TOKEN"


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    defaults = Sampling()
    parser.add_argument("--model", help="an llmsys export (<run>/final) to sample the responses from")
    parser.add_argument("--prompts", help=".txt (one prompt per line) or .jsonl/.parquet rows with 'prompt' "
                                          "(or chat rows: their last user turn is the prompt)")
    parser.add_argument("--k", type=int, default=defaults.k, help="responses per prompt (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--chat-template", default="auto", help="as data.chat_template: auto or chatml")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmsys.rank", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="sample K responses per prompt into a candidates file")
    _sampling_args(sample)
    sample.add_argument("--out", required=True, help="the candidates file to write (JSON Lines)")
    serve = commands.add_parser("serve", help="serve the ranking page (and the stages side by side)")
    _sampling_args(serve)
    serve.add_argument("--candidates", help="the items to rank (from `sample`); with --model: where to sample "
                                            "them to (default <out>.candidates)")
    serve.add_argument("--out", default="rankings.jsonl", help="the rankings file (appended; default %(default)s)")
    serve.add_argument("--compare", help="a side_by_side.json of the pipeline, shown at /compare")
    serve.add_argument("--host", default="127.0.0.1", help="default %(default)s; any other address needs --token")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s; 0 picks a free one")
    serve.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"a secret every request must carry (default ${TOKEN_ENV})")
    stats = commands.add_parser("stats", help="counts and inter-annotator agreement of a rankings file")
    stats.add_argument("rankings", nargs="?", default="rankings.jsonl")
    stats.add_argument("--candidates", help="the candidates file, to count the items nobody ranked yet")
    stats.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _sampling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Sampling:
    try:
        return Sampling(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))


def _sample(args: argparse.Namespace, sampling: Sampling) -> list[Item]:
    import torch

    from llmsys.eval.probes import load_export

    prompts = read_prompts(args.prompts)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_export(args.model, device)
    items, left_out = sample_items(model, tokenizer, prompts, sampling, model_name=str(args.model),
                                   chat_template=args.chat_template)
    for text in left_out:
        logger.warning("left out (too few distinct answers): %s", text[:120])
    if not items:
        raise DataError(f"{args.model}: no prompt of {args.prompts} got {sampling.k} distinct non-empty answers; "
                        f"raise --temperature or --max-new-tokens, or lower --k")
    logger.info("sampled %d items (%d prompts, %d left out) from %s", len(items), len(prompts), len(left_out),
                args.model)
    return items


def _reusable(items: list[Item], args: argparse.Namespace, sampling: Sampling, path: Path) -> list[Item]:
    """The candidates an earlier ``serve --model`` wrote, if they were made the way this one would make them."""
    prompts = {json.dumps(m, sort_keys=True) for m in read_prompts(args.prompts)}
    for item in items:
        if item.model is None or Path(item.model).resolve() != Path(args.model).resolve():
            raise DataError(f"{path}: sampled from {item.model!r}, not --model {args.model}; remove the file to "
                            f"sample again, or pass --candidates elsewhere")
        if item.sampling != sampling.as_dict():
            raise DataError(f"{path}: sampled with {item.sampling}, not {sampling.as_dict()}; remove the file to "
                            f"sample again, or pass the same settings")
        if json.dumps(item.messages, sort_keys=True) not in prompts:
            raise DataError(f"{path}: holds the prompt {item.messages[-1]['content'][:60]!r}, which is not in "
                            f"{args.prompts}; remove the file to sample again")
    return items


def _serve_items(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Item]:
    if args.model:
        if not args.prompts:
            parser.error("serve --model needs --prompts")
        sampling = _sampling(parser, args)
        path = Path(args.candidates) if args.candidates else side_file(Path(args.out), "candidates")
        if path.exists():
            logger.info("reusing the candidates sampled earlier: %s", path)
            return _reusable(read_candidates(path), args, sampling, path)
        items = _sample(args, sampling)
        write_candidates(path, items)
        logger.info("candidates written to %s (a restart reuses them)", path)
        return items
    if args.candidates:
        return read_candidates(args.candidates)
    if args.compare:
        return []
    parser.error("serve needs --candidates FILE, or --model DIR --prompts FILE (and/or --compare FILE)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket bound before uvicorn starts, so ``--port 0`` can report the port it got."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart after kill -9 gets the port back
    sock.bind(address)
    return sock


def serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import uvicorn

    if not _is_loopback(args.host) and not args.token:
        parser.error(f"refusing to serve on {args.host} without a token: anyone who can reach it could read the "
                     f"model's answers and write rankings; add --token SECRET (or ${TOKEN_ENV}) and open "
                     f"/?token=SECRET")
    compare = read_side_by_side(args.compare) if args.compare else None
    items = _serve_items(parser, args)
    store = RankingStore(args.out) if items else None
    if store is not None:
        decided = store.all_decisions()
        if decided:
            logger.info("%s: %d decisions by %d annotators already; each resumes at their first undecided item",
                        args.out, len(decided), len({who for who, _ in decided}))
    app = create_app(items, store, compare=compare, token=args.token,
                     allowed_hosts=None if args.token else LOOPBACK_NAMES | {args.host})
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    query = "?token=<token>" if args.token else ""
    print(f"llmsys.rank: {len(items)} items -> {args.out if items else '(nothing to rank)'}; serving "
          f"http://{host}:{port}/{query}" + (f" and http://{host}:{port}/compare" if compare else ""), flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        if store is not None:
            store.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "sample":
            if not args.model or not args.prompts:
                parser.error("sample needs --model and --prompts")
            path = write_candidates(args.out, _sample(args, _sampling(parser, args)))
            print(f"candidates written to {path}")
        elif args.command == "serve":
            serve(parser, args)
        else:
            report = ranking_stats(args.rankings, args.candidates)
            print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_stats(report))
    except (DataError, StoreError, CompareError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
