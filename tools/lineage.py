"""Inspect and manage a lineage of model versions.

    python tools/lineage.py --dir LINEAGE list
    python tools/lineage.py --dir LINEAGE show ID
    python tools/lineage.py --dir LINEAGE tree
    python tools/lineage.py --dir LINEAGE diff A B
    python tools/lineage.py --dir LINEAGE verify [ID ...]          # exit 1 if anything was tampered with

list, tree and show mark a version whose record is damaged, or whose parents are missing or loop, as
DAMAGED and exit 1 after showing the others; diff and export refuse one (exit 2). Read commands never write.
    python tools/lineage.py --dir LINEAGE export ID --out DIR [--format hf|safetensors] [--dtype bfloat16]
                                                   [--max-shard-bytes N]
        # a LoRA version: also its PEFT adapter (for the parent version) in DIR/adapter [--peft-base PATH]
    python tools/lineage.py --dir LINEAGE import-hf HF_DIR [--id ID]
    python tools/lineage.py --dir LINEAGE merge A B [C ...] --id NEW [--weights 0.5 0.3 0.2]   # model soup
    python tools/lineage.py --dir LINEAGE interpolate A [B] --alpha 0.5 --id NEW   # WiSE-FT; B = A's parent
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmadapt.lineage.records import read_json_object  # noqa: E402
from lmadapt.lineage.store import Lineage, LineageError, check_version_id  # noqa: E402
from lmadapt.model import per_layer  # noqa: E402


def cmd_list(lineage: Lineage, args: argparse.Namespace) -> int:
    """Every version, oldest first; a damaged one is one line marked DAMAGED (exit 1, the others listed)."""
    records, problems = lineage.survey()
    ids = lineage.ids()
    if not ids:
        print(f"lineage {lineage.directory} has no versions")
        return 0
    rows = [("id", "parents", "created", "steps", "tokens", "eval/loss", "note")]
    for vid in ids:
        r = records.get(vid)
        if r is None:  # unreadable: its id alone, then the problem, in the row below
            rows.append((vid, "", "", "", "", "", ""))
            continue
        loss = r.get("metrics", {}).get("eval/loss")
        rows.append((vid, ",".join(r["parents"]) or "-", r["created"][:19], str(r["steps"]), f"{r['tokens']:,}",
                     f"{loss:.4f}" if isinstance(loss, float) else "-", r.get("note", "")[:40]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        if row[0] in problems and row is not rows[0]:
            line = f"{row[0].ljust(widths[0])}  DAMAGED: {_problems(lineage, problems[row[0]])}"
        print(line)
    return _damaged(lineage, problems)


def _problems(lineage: Lineage, problems: list[str]) -> str:
    """A version's problems on one line, paths relative to the lineage."""
    return "; ".join(problems).replace(lineage.directory + os.sep, "")


def _damaged(lineage: Lineage, problems: dict[str, list[str]]) -> int:
    """Exit status of a listing: 1 (and one line on stderr) when versions were marked damaged."""
    if not problems:
        return 0
    names = sorted(problems)
    print(f"error: lineage {lineage.directory}: {len(names)} damaged version(s) ({', '.join(names[:5])}"
          f"{', ...' if len(names) > 5 else ''}); `python tools/lineage.py --dir {lineage.directory} verify` lists "
          f"every problem", file=sys.stderr)
    return 1


def cmd_show(lineage: Lineage, args: argparse.Namespace) -> int:
    """A version's record and metrics; a damaged record is shown as far as it reads, with exit 1."""
    if not lineage.exists(args.id):
        lineage.record(args.id)  # no such version: a usage error (exit 2)
    try:
        record = lineage.record(args.id)
        problems = lineage.graph_problems(args.id)
    except LineageError as e:
        with contextlib.suppress(LineageError):  # show what there is: the operator must see what is wrong
            print(json.dumps(read_json_object(os.path.join(lineage.path(args.id), "record.json")), indent=2))
        print(f"error: {e}", file=sys.stderr)
        return 1
    record = {**record, "metrics": lineage.metrics(args.id)}
    if not args.full:
        record["config"] = "(omitted; --full shows it)"
    print(json.dumps(record, indent=2))
    return _damaged(lineage, {args.id: problems} if problems else {})


def cmd_tree(lineage: Lineage, args: argparse.Namespace) -> int:
    """The version graph by first parent; damaged versions are marked (exit 1) and parent loops shown once."""
    records, problems = lineage.survey()
    ids = lineage.ids()
    first = {v: (records[v]["parents"] or [None])[0] if v in records else None for v in ids}
    children: dict[str, list[str]] = {v: [] for v in ids}
    for vid in ids:
        if first[vid] in children and first[vid] != vid:
            children[first[vid]].append(vid)
    # Roots first; what they do not reach (loops of parents, and what descends from them) after, each once.
    starts = [v for v in ids if first[v] not in children or first[v] == v]
    starts += [v for v in ids if v not in starts]
    shown: set[str] = set()
    for start in starts:
        todo = [(start, "", True, True)]  # a stack, not recursion: a lineage can be longer than Python's limit
        while todo:
            vid, prefix, last, top = todo.pop()
            if vid in shown:
                continue
            shown.add(vid)
            label = _tree_label(lineage, vid, records.get(vid), problems.get(vid))
            print(label if top else f"{prefix}{'└── ' if last else '├── '}{label}")
            kids = [k for k in children[vid] if k not in shown]
            below = prefix if top else prefix + ("    " if last else "│   ")
            todo += [(k, below, i == len(kids) - 1, False) for i, k in reversed(list(enumerate(kids)))]
    return _damaged(lineage, problems)


def _tree_label(lineage: Lineage, vid: str, r: dict[str, Any] | None, problems: list[str] | None) -> str:
    if r is None:
        return f"{vid}  DAMAGED: {_problems(lineage, problems or [])}"
    extra = f"  (+ parents {', '.join(r['parents'][1:])})" if len(r["parents"]) > 1 else ""
    label = f"{vid}  steps={r['steps']} tokens={r['tokens']:,}{extra}"
    return f"{label}  DAMAGED: {_problems(lineage, problems)}" if problems else label


def cmd_diff(lineage: Lineage, args: argparse.Namespace) -> int:
    """Config, data sources, tokens seen and per-layer relative param change from version A to B."""
    from lmadapt.lineage.compare import config_changes, layer_changes, source_changes

    a, b = lineage.record(args.a), lineage.record(args.b)
    print(f"config ({args.a} -> {args.b}):")
    changed = config_changes(a, b)
    for k, old, new in changed:
        print(f"  {k}: {old!r} -> {new!r}")
    if not changed:
        print("  (same)")
    print("data:")
    for mark, name, weight in source_changes(a, b):
        detail = {"+": f": weight {weight}", "~": ": different files or contents"}.get(mark, "")
        print(f"  {mark} {name}{detail}")
    ta, tb = a.get("data", {}).get("tokens_seen", {}), b.get("data", {}).get("tokens_seen", {})
    for name in sorted(set(ta) | set(tb)):
        print(f"    tokens {name}: {ta.get(name, 0):,} -> {tb.get(name, 0):,}")
    changes = layer_changes(lineage.load_params(args.a, scan_layers=False),
                            lineage.load_params(args.b, scan_layers=False))
    if changes is None:
        print("params: different architectures; no per-layer comparison")
        return 0
    print("params: relative change ||B-A|| / ||A|| per layer")
    for name, change in changes.items():
        print(f"  {name:<16} {change:.6f}")
    return 0


def cmd_verify(lineage: Lineage, args: argparse.Namespace) -> int:
    """Recompute every file and params hash, check records and parent links, and look over metrics/:
    exit 1 if anything is damaged. Stale cached results are notes (they are ignored, so harmless)."""
    for vid in args.ids:
        if not lineage.exists(vid):
            lineage.record(vid)  # an unknown or malformed id is a usage error (exit 2), not a tampered version
    bad = 0
    for vid in args.ids or lineage.ids():
        problems = lineage.verify(vid)
        if problems:
            bad += 1
            print(f"{vid}: TAMPERED")
            for p in problems:
                print(f"  {_problems(lineage, [p])}")
        else:
            print(f"{vid}: ok")
    problems, notes = lineage.verify_metrics(args.ids or None)
    for p in problems:
        name, _, what = p.partition(": ")
        print(f"{name}: DAMAGED\n  {what}")
    for n in notes:
        print(f"note: {n}")
    return 1 if bad or problems else 0


def cmd_export(lineage: Lineage, args: argparse.Namespace) -> int:
    """A version as a Hugging Face directory or one safetensors file. Like save_pretrained, a missing --out
    folder is created; nothing is ever overwritten; both are written aside and renamed into place."""
    from lmadapt import hf
    from lmadapt.hf.common import check_empty_target, check_new_file, make_parents, remove_made

    # Refuse an occupied target before reading the params (minutes for a large model).
    out = (check_new_file if args.format == "safetensors" else check_empty_target)(args.out)
    params = lineage.load_params(args.id, scan_layers=False)
    model = lineage.model_config(args.id)
    if args.format == "safetensors":
        made = make_parents(out)
        try:
            hf.save_safetensors_dump(out, params, args.dtype)
        except BaseException:
            remove_made(made)
            raise
    else:
        from lmadapt.hf.peft import version_adapter

        # A LoRA version's adapters are converted before anything is written, then go to OUT/adapter.
        adapter, note = version_adapter(lineage, args.id, args.peft_base)
        # Params were loaded in the unstacked layout, whatever the version was trained with.
        hf.export_hf(args.out, params, per_layer(model),
                     tokenizer=lineage.tokenizer(args.id), dtype=args.dtype, max_shard_bytes=args.max_shard_bytes)
        if adapter is not None:
            note = f"wrote {adapter.write(os.path.join(args.out, 'adapter'))}: {note}"
        if note:
            print(note)
    print(f"exported {args.id} to {args.out} ({args.format}, {args.dtype})")
    return 0


def cmd_merge(lineage: Lineage, args: argparse.Namespace) -> int:
    """Average versions (model soup) or interpolate one with another (WiSE-FT) into a new version."""
    from lmadapt.continual.merge import publish_interpolation, publish_merge

    if args.command == "interpolate":
        note = publish_interpolation(lineage, args.a, args.b, args.alpha, args.id, note=args.note)
    else:
        note = publish_merge(lineage, args.versions, args.id, args.weights, note=args.note)
    print(f"published {args.id}: {note}")
    return 0


def cmd_import_hf(lineage: Lineage, args: argparse.Namespace) -> int:
    from lmadapt.hf import open_hf
    from lmadapt.lineage.origin import import_root

    if args.id is not None:
        check_version_id(args.id)  # before the import's work, and so that --id "" is not taken as no id
    ckpt = open_hf(args.hf_dir)  # validates config, tensor headers and tokenizer before anything is written
    tokenizer = ckpt.require_tokenizer()
    vid = import_root(lineage, args.hf_dir, ckpt.load(), ckpt.config, tokenizer, version_id=args.id)
    print(f"imported {args.hf_dir} as version {vid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="the lineage directory")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every version, oldest first")
    p = sub.add_parser("show", help="a version's record and metrics")
    p.add_argument("id")
    p.add_argument("--full", action="store_true", help="include the full run config")
    sub.add_parser("tree", help="the version graph")
    p = sub.add_parser("diff", help="config, data and per-layer parameter change from A to B")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("verify", help="recompute file and params hashes")
    p.add_argument("ids", nargs="*")
    p = sub.add_parser("export", help="write a version as a Hugging Face directory or a safetensors file")
    p.add_argument("id")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["hf", "safetensors"], default="hf")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-shard-bytes", type=int, default=5 * 10**9,
                   help="hf format: split the weights into files of at most this size, with an index (default 5e9)")
    p.add_argument("--peft-base", default=None, help="a LoRA version's PEFT adapter (OUT/adapter): its "
                   "base_model_name_or_path (default: the HF directory the parent version was imported from)")
    p = sub.add_parser("merge", help="average versions into a new one (model soup)")
    p.add_argument("versions", nargs="+")
    p.add_argument("--id", required=True)
    p.add_argument("--weights", type=float, nargs="+", default=None)
    p.add_argument("--note", default="")
    p = sub.add_parser("interpolate", help="(alpha) A + (1 - alpha) B, B defaulting to A's parent (WiSE-FT)")
    p.add_argument("a")
    p.add_argument("b", nargs="?")
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--note", default="")
    p = sub.add_parser("import-hf", help="add a local Hugging Face checkpoint as a root version")
    p.add_argument("hf_dir")
    p.add_argument("--id", default=None)
    args = parser.parse_args(argv)

    commands = {"list": cmd_list, "show": cmd_show, "tree": cmd_tree, "diff": cmd_diff, "verify": cmd_verify,
                "export": cmd_export, "import-hf": cmd_import_hf, "merge": cmd_merge, "interpolate": cmd_merge}
    from lmadapt.config import ConfigError
    from lmadapt.data.tokenizers import TokenizerError

    errors: tuple[type[Exception], ...] = (LineageError, ConfigError, TokenizerError)
    try:
        from lmadapt.hf import HFError

        errors += (HFError,)
    except ImportError:
        pass
    if not os.path.isdir(args.dir) and args.command != "import-hf":
        print(f"error: lineage directory {args.dir!r} not found", file=sys.stderr)
        return 2
    try:
        return commands[args.command](Lineage(args.dir), args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system's refusal (read-only, full, permissions): one line, never a traceback
        print(f"error: {e.filename or args.dir}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
