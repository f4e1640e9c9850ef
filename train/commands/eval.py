"""`stgr eval --model PATH --data FILE --out DIR [overrides]`: evaluation report (JSON + Markdown).

Overrides are Hydra syntax on conf/eval/default.yaml, e.g. `data.video_dir=DIR`,
`backend=transformers|vllm|openai`, `tts.num_samples=8`, `model=tiny`, `judge.backend=openai
judge.model=Qwen/Qwen2.5-72B-Instruct`. A rerun with the same arguments reuses every stored
completion and only calls the model for what is missing.
"""
from __future__ import annotations

import argparse

from train.commands._inputs import check_data, check_model, check_output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model on V-STaR, Video-MME, WorldSense, VideoMMMU or an STGR split",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id of the model under test")
    parser.add_argument("--data", required=True,
                        help="a V-STaR annotation JSON, a benchmark file or folder (Video-MME, WorldSense, "
                             "VideoMMMU, generic with data.format=mcq), or an STGR dataset (run, dataset or split dir)")
    parser.add_argument("--out", required=True, help="output directory (results.json, report.md, completions/)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.video_dir=videos/ tts.num_samples=8")
    parser.set_defaults(func=handler)


#: Backends that load the weights of `--model` themselves (the others ask a server or replay a file).
LOCAL_BACKENDS = ("transformers", "vllm")


def handler(args: argparse.Namespace) -> int:
    from train.eval.mcq_data import TITLES
    from train.evaluate import load_config, run_eval

    check_data(args.data, "--data")
    check_output_dir(args.out, "--out")
    cfg = load_config(args.model, args.data, args.overrides)
    if cfg.backend in LOCAL_BACKENDS:
        check_model(args.model, cfg.model.get("revision"), "--model")

    result = run_eval(args.model, args.data, args.out, args.overrides)
    overall = result["summary"]["overall"]
    if result["format"] == "vstar":
        print(f"V-STaR: {overall['n']} items, Acc {100 * overall['acc']:.1f}, "
              f"mAM {100 * overall.get('mAM', 0.0):.1f}, mLGM {100 * overall.get('mLGM', 0.0):.1f}; "
              f"report: {args.out}/report.md")
    elif result["format"] in TITLES:
        print(f"{TITLES[result['format']]}: {overall['n']} questions, Acc {100 * overall['acc']:.1f}, "
              f"{overall['unparsed']} unparsed; report: {args.out}/report.md")
    else:
        print(f"STGR: {overall['n']} records, accuracy {100 * overall['acc']:.1f}; report: {args.out}/report.md")
    return 0
