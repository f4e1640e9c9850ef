"""Aggregates and the Markdown report: V-STaR's table (overall, per domain, per duration) and the
STGR table (per task), from the per-sample scores. Every number is a fraction in the JSON and a
percentage in the Markdown (as V-STaR's leaderboard prints them); LGM is not a fraction and is
printed x100 the same way the V-STaR paper does.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from stages.lib import metrics

TIOU_THRESHOLDS = (0.3, 0.5, 0.7)
AP_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
DURATION_ORDER = ("short (<60 s)", "medium (60-180 s)", "long (>=180 s)")


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return float(np.mean(v)) if v else 0.0


def _tts_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    with_tts = [r["tts"] for r in rows if r.get("tts")]
    if not with_tts:
        return None
    return {
        "n": len(with_tts),
        "num_samples": len(with_tts[0]["samples"]),
        "majority_acc": _mean(float(t["majority"]["correct"]) for t in with_tts),
        "confidence_acc": _mean(float(t["confidence"]["correct"]) for t in with_tts),
        "picks_differ": sum(t["majority"]["key"] != t["confidence"]["key"] for t in with_tts),
    }


def vstar_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """V-STaR's numbers for a group of items (see docs/evaluation.md for each formula)."""
    n = len(rows)
    acc = _mean(float(r["correct"]) for r in rows)
    out: dict[str, Any] = {"n": n, "acc": acc, "judge_mean": _mean(max(r["judge"], 0) for r in rows),
                           "judge_invalid": sum(r["judge"] < 0 for r in rows)}
    chains = []
    for c in (1, 2):
        tious = [r[f"chain{c}"]["tiou"] for r in rows]
        m_tiou = _mean(tious)
        m_viou = _mean(r[f"chain{c}"]["viou"] for r in rows)
        ap = {f"{t:g}": _mean(metrics.recall_at(r[f"chain{c}"]["ious"], [t])[t] for r in rows) for t in AP_THRESHOLDS}
        out[f"chain{c}"] = {"m_tiou": m_tiou, "R": {f"{t:g}": v for t, v in metrics.recall_at(tious, TIOU_THRESHOLDS).items()},
                            "m_viou": m_viou, "AP": ap}
        chains.append((m_tiou, m_viou))
    out.update(metrics.vstar_chain_summary(acc, chains, n_samples=n) if n else {})
    tts = _tts_summary(rows)
    if tts:
        out["tts"] = tts
    return out


def vstar_groups(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    domains = sorted({r["domain"] for r in rows})
    durations = [d for d in DURATION_ORDER if any(r["duration"] == d for r in rows)]
    return {
        "overall": vstar_summary(rows),
        "by_domain": {d: vstar_summary([r for r in rows if r["domain"] == d]) for d in domains},
        "by_duration": {d: vstar_summary([r for r in rows if r["duration"] == d]) for d in durations},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _problems(rows: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    counts = Counter(p.split(":")[0] + ":" + p.split(":")[1] if p.count(":") > 1 else p
                     for r in rows for p in r.get("problems", []))
    if not counts:
        return []
    lines = ["## Problems", "", f"Samples with a problem: {sum(bool(r.get('problems')) for r in rows)} of {len(rows)} "
             "(each scores 0 where its answer is missing or unreadable; every sample counts).", "",
             "| problem | samples |", "| --- | ---: |"]
    lines += [f"| {p} | {c} |" for p, c in counts.most_common(20)]
    examples = [(r[key], p) for r in rows for p in r.get("problems", [])][:10]
    lines += ["", "First examples:", ""] + [f"- `{k}`: {p}" for k, p in examples]
    return lines + [""]


def _tts_lines(summary: Mapping[str, Any]) -> list[str]:
    t = summary.get("tts")
    if not t:
        return []
    return ["## Test-time scaling", "",
            f"{t['num_samples']} samples per question on {t['n']} questions; crops of the cited boxes rated by the "
            "model (0/1/2 -> 0.2/0.6/1.0, no crop 0.2).", "",
            "| vote | accuracy |", "| --- | ---: |",
            f"| majority | {_pct(t['majority_acc'])} |",
            f"| confidence-weighted | {_pct(t['confidence_acc'])} |", "",
            f"The two votes picked different answers on {t['picks_differ']} question(s).", ""]


def vstar_markdown(result: Mapping[str, Any]) -> str:
    g = result["summary"]
    o = g["overall"]
    head = ["# V-STaR evaluation", "",
            f"- model: `{result['model']}` (backend `{result['backend']}`)",
            f"- data: `{result['data']}` ({o['n']} items)",
            f"- judge: `{result['judge']}` (0-3, >= 2 correct; mean score {o['judge_mean']:.2f}, "
            f"{o['judge_invalid']} unreadable or unanswered)", "",
            "## Overall", "",
            "| chain | Acc | m_tIoU | R@0.3 | R@0.5 | R@0.7 | m_vIoU | AP@0.1 | AP@0.3 | AP@0.5 | AP@0.7 | AP@0.9 | AM | LGM |",
            "| --- | " + " | ".join(["---:"] * 13) + " |"]
    for c, name in ((1, "1: what -> when -> where"), (2, "2: what -> where -> when")):
        ch = o[f"chain{c}"]
        cells = [_pct(o["acc"]), _pct(ch["m_tiou"])] + [_pct(ch["R"][f"{t:g}"]) for t in TIOU_THRESHOLDS] + \
                [_pct(ch["m_viou"])] + [_pct(ch["AP"][f"{t:g}"]) for t in AP_THRESHOLDS] + \
                [_pct(o.get(f"AM_{c}", 0.0)), _pct(o.get(f"LGM_{c}", 0.0))]
        head.append(f"| {name} | " + " | ".join(cells) + " |")
    head += ["", f"**mAM {_pct(o.get('mAM', 0.0))}**, **mLGM {_pct(o.get('mLGM', 0.0))}**", ""]
    for title, groups in (("By domain", g["by_domain"]), ("By video duration", g["by_duration"])):
        head += [f"## {title}", "",
                 "| group | n | Acc | m_tIoU 1 | m_vIoU 1 | m_tIoU 2 | m_vIoU 2 | mAM | mLGM |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, s in groups.items():
            head.append(f"| {name} | {s['n']} | {_pct(s['acc'])} | {_pct(s['chain1']['m_tiou'])} | "
                        f"{_pct(s['chain1']['m_viou'])} | {_pct(s['chain2']['m_tiou'])} | {_pct(s['chain2']['m_viou'])} | "
                        f"{_pct(s.get('mAM', 0.0))} | {_pct(s.get('mLGM', 0.0))} |")
        head.append("")
    head += _tts_lines(o)
    head += _problems(result["samples"], "vid")
    return "\n".join(head)
