"""The dashboard as a static site, written one feature at a time (memory stays per-feature):

    index.html            search by feature id or by the tokens a feature fires on; feature density
    f/<id>.html           one page per feature: stats, histogram, top contexts, quantile samples,
                          promoted / suppressed tokens (causal LMs), nearest features
    features.json         the index's data;  meta.json  what was read and how
    neuronpedia/batch-<j>.json   (with --neuronpedia) SAEDashboard's NeuronpediaRunner batch format, which Neuronpedia's
                          import script (convert-saedashboard-to-neuronpedia-export.py) reads

Pages need no server and no network (works from file:// too); `sae-dist dashboard serve` serves them.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from sae_dist.features.assets import INDEX_HTML, STYLE_CSS
from sae_dist.features.collect import HIST_BINS, HIST_HI, HIST_LO, FeatureStats, _Bank

WINDOW_BEFORE, WINDOW_AFTER = 24, 8
"""Tokens shown before and after the highlighted token on the pages (Neuronpedia gets whole contexts)."""
NEURONPEDIA_BATCH = 128


def token_texts(tokenizer: Any) -> Callable[[int], str]:
    """id -> how the token reads in running text (WordPiece '##ing' -> 'ing', 'cat' -> ' cat')."""
    wordpiece = any(t.startswith("##") for t in list(tokenizer.get_vocab())[:5000])
    cache: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in cache:
            if wordpiece:
                t = tokenizer.convert_ids_to_tokens(i)
                cache[i] = t[2:] if t.startswith("##") else " " + t
            else:
                cache[i] = tokenizer.decode([i])
        return cache[i]

    return text


def _bin_centres() -> list[float]:
    w = (HIST_HI - HIST_LO) / HIST_BINS
    return [10 ** (HIST_LO + w * (b + 0.5)) for b in range(HIST_BINS)]


def _quantile(hist: list[int], value: float) -> float:
    """Fraction of this feature's firings below `value` (from the histogram, mid-bin)."""
    b = min(max(int((torch.tensor(value).log10().item() - HIST_LO) * HIST_BINS / (HIST_HI - HIST_LO)), 0), HIST_BINS - 1)
    total = sum(hist) or 1
    return (sum(hist[:b]) + hist[b] / 2) / total


def _contexts(bank: _Bank, s: int, stats: FeatureStats, text: Callable[[int], str]) -> list[dict[str, Any]]:
    out = []
    for j in range(bank.k):
        c = int(bank.ctx[s, j])
        if c < 0:
            break
        ids = stats.context_tokens[c].tolist()
        out.append({"tokens": [text(i) for i in ids], "values": [round(v, 3) for v in bank.acts[s, j].float().tolist()],
                    "pos": int(bank.pos[s, j]), "value": round(float(bank.value[s, j]), 4)})
    return out


def feature_record(s: int, stats: FeatureStats, views: Any, text: Callable[[int], str]) -> dict[str, Any]:
    """Everything shown about the feature in slot s, as plain JSON-able data."""
    count = int(stats.count[s])
    hist = stats.hist[s].tolist()
    rec: dict[str, Any] = {
        "id": int(stats.features[s]),
        "count": count,
        "frequency": count / max(stats.tokens, 1),
        "max": round(float(stats.act_max[s]), 4),
        "mean": round(float(stats.act_sum[s]) / count, 4) if count else 0.0,
        "hist": hist,
        "top": _contexts(stats.top, s, stats, text),
        "samples": sorted(_contexts(stats.samples, s, stats, text), key=lambda c: -c["value"]),
        "neighbors": [[int(i), round(float(c), 4)] for i, c in zip(views.neighbors[s], views.neighbor_cos[s])],
    }
    for sample in rec["samples"]:
        sample["quantile"] = round(_quantile(hist, sample["value"]), 3)
    if views.promoted is not None:
        rec["promoted"] = [[text(int(i)), round(float(v), 4)] for i, v in zip(views.promoted[s], views.promoted_logit[s])]
        rec["suppressed"] = [[text(int(i)), round(float(v), 4)] for i, v in zip(views.suppressed[s], views.suppressed_logit[s])]
        counts, centres = views.logit_hist
        rec["logit_hist"] = [counts[s].tolist(), [round(v, 4) for v in centres[s].tolist()]]
    return rec


def _svg_bars(heights: list[float], labels: tuple[str, str], width: int = 360, height: int = 110) -> str:
    top = max(heights) or 1
    bw = width / max(len(heights), 1)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - h / top * height:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{h / top * height:.1f}"/>' for i, h in enumerate(heights) if h
    )
    return (f'<svg class="hist" viewBox="0 0 {width} {height + 16}" width="{width}" height="{height + 16}">{bars}'
            f'<text x="0" y="{height + 13}">{html.escape(labels[0])}</text>'
            f'<text x="{width}" y="{height + 13}" text-anchor="end">{html.escape(labels[1])}</text></svg>')


def _context_html(ctx: dict[str, Any], vmax: float) -> str:
    p = ctx["pos"]
    lo, hi = max(p - WINDOW_BEFORE, 0), min(p + WINDOW_AFTER + 1, len(ctx["tokens"]))
    spans = []
    for i in range(lo, hi):
        v, t = ctx["values"][i], html.escape(ctx["tokens"][i])
        if v > 0:
            cls = "tok on max" if i == p else "tok on"
            alpha = min(1.0, 0.1 + 0.9 * v / (vmax or 1))
            lead = " " if t.startswith(" ") else ""  # highlight the word, not the space before it
            spans.append(f'{lead}<span class="{cls}" style="background:rgba(234,88,12,{alpha:.2f})" '
                         f'title="{v:.3f}">{t[len(lead):]}</span>')
        else:
            spans.append(f'<span class="tok">{t}</span>')
    label = f'{ctx["value"]:.3f}' + (f' · q{ctx["quantile"]:.2f}' if "quantile" in ctx else "")
    return f'<div class="ctx"><span class="v">{label}</span>{"".join(spans)}</div>'


def _token_table(rows: list[list[Any]], cls: str) -> str:
    body = "".join(f'<tr><td class="{cls}">{html.escape(t)}</td><td>{v:+.3f}</td></tr>' for t, v in rows)
    return f"<table>{body}</table>"


def _feature_link(i: int) -> str:
    return f'<a href="{i}.html">{i}</a>'


def feature_page(rec: dict[str, Any], prev_id: int | None, next_id: int | None, pages: set[int]) -> str:
    fid = rec["id"]
    nav = ['<a href="../index.html">all features</a>']
    nav += [f'<a href="{prev_id}.html">&larr; {prev_id}</a>'] if prev_id is not None else []
    nav += [f'<a href="{next_id}.html">{next_id} &rarr;</a>'] if next_id is not None else []
    hist = rec["hist"]
    nz = [i for i, h in enumerate(hist) if h]
    cent = _bin_centres()
    hist_svg = (_svg_bars(hist[nz[0] : nz[-1] + 1], (f"{cent[nz[0]]:.3g}", f"{cent[nz[-1]]:.3g} (log scale)"))
                if nz else "<p>never fired</p>")
    neigh = "".join(
        f'<li>{_feature_link(i) if i in pages else i} <span class="dim">cos {c:.3f}</span></li>'
        for i, c in rec["neighbors"]
    )
    logit = ""
    if "promoted" in rec:
        logit = (f'<section><h2>Promotes (W_dec &middot; W_U)</h2>{_token_table(rec["promoted"], "pos")}</section>'
                 f'<section><h2>Suppresses</h2>{_token_table(rec["suppressed"], "neg")}</section>')
    top = "".join(_context_html(c, rec["max"]) for c in rec["top"]) or "<p>never fired</p>"
    bands = []
    for lo, hi in ((0.75, 1.01), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25)):
        inside = [c for c in rec["samples"] if lo <= c["quantile"] < hi]
        if inside:
            name = f"quantile {lo:.2f}&ndash;{min(hi, 1):.2f}"
            bands.append(f"<h3>{name}</h3>" + "".join(_context_html(c, rec["max"]) for c in inside))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Feature {fid}</title>
<link rel="stylesheet" href="../style.css"></head><body>
<nav>{" &middot; ".join(nav)}</nav>
<h1>Feature {fid}</h1>
<p class="stats">fires on {rec["frequency"]:.4%} of tokens ({rec["count"]}) &middot; max {rec["max"]:.3f}
&middot; mean when firing {rec["mean"]:.3f}</p>
<div class="cols"><section><h2>Activation histogram</h2>{hist_svg}</section>{logit}
<section><h2>Nearest features (decoder cosine)</h2><ol>{neigh}</ol></section></div>
<h2>Top activations</h2><div id="top">{top}</div>
<h2>Quantile samples</h2><div id="samples">{"".join(bands) or "<p>none</p>"}</div>
</body></html>"""


def neuronpedia_feature(rec: dict[str, Any]) -> dict[str, Any]:
    """One feature in SAEDashboard's NeuronpediaRunner batch format."""
    cent = _bin_centres()
    nz = [i for i, h in enumerate(rec["hist"]) if h]

    def acts(ctxs: list[dict[str, Any]], lo: float, hi: float) -> list[dict[str, Any]]:
        return [{"tokens": c["tokens"], "values": c["values"], "bin_min": lo, "bin_max": hi, "bin_contains": len(ctxs),
                 "qualifying_token_index": c["pos"]} for c in ctxs]

    samples = rec["samples"]
    logit_hist = rec.get("logit_hist", [[], []])
    return {
        "feature_index": rec["id"],
        "pos_str": [t for t, _ in rec.get("promoted", [])], "pos_values": [v for _, v in rec.get("promoted", [])],
        "neg_str": [t for t, _ in rec.get("suppressed", [])], "neg_values": [v for _, v in rec.get("suppressed", [])],
        "frac_nonzero": rec["frequency"],
        "freq_hist_data_bar_heights": [rec["hist"][i] for i in nz],
        "freq_hist_data_bar_values": [round(cent[i], 5) for i in nz],
        "logits_hist_data_bar_heights": logit_hist[0], "logits_hist_data_bar_values": logit_hist[1],
        "decoder_weights_dist": [],
        "neuron_alignment_indices": rec.get("align_idx", []), "neuron_alignment_values": rec.get("align_val", []),
        "neuron_alignment_l1": rec.get("align_l1", []),
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "activations": acts(rec["top"], -1, -1)
        + acts(samples, min((c["value"] for c in samples), default=0), max((c["value"] for c in samples), default=0)),
    }


def _layer_of(hook_name: str) -> int:
    m = re.search(r"\d+", hook_name)
    return int(m.group()) if m else 0


def write_site(out_dir: str, stats: FeatureStats, views: Any, tokenizer: Any, meta: dict[str, Any],
               W_dec: torch.Tensor | None = None, neuronpedia: bool = False) -> None:
    """`neuronpedia` also writes neuronpedia/batch-<j>.json (whole contexts: ~60 KB per feature)."""
    os.makedirs(os.path.join(out_dir, "f"), exist_ok=True)
    if neuronpedia:
        os.makedirs(os.path.join(out_dir, "neuronpedia"), exist_ok=True)
    text = token_texts(tokenizer)
    ids = stats.features.tolist()
    pages = set(ids)
    summary: list[list[Any]] = []
    batch: list[dict[str, Any]] = []
    n_batch = 0
    np_head = {"model_id": meta["model_name"], "layer": _layer_of(meta["hook_name"]), "sae_id_suffix": None,
               "hook_name": meta["hook_name"], "n_tokens_in_prompt": stats.top.acts.shape[-1]}

    def flush() -> None:
        nonlocal batch, n_batch
        if batch:
            with open(os.path.join(out_dir, "neuronpedia", f"batch-{n_batch}.json"), "w") as fh:
                json.dump(np_head | {"features": batch}, fh)
            batch, n_batch = [], n_batch + 1

    for s, fid in enumerate(ids):
        rec = feature_record(s, stats, views, text)
        if W_dec is not None:
            w = W_dec[fid].abs()
            top = w.topk(min(3, len(w)))
            rec["align_idx"], rec["align_val"] = top.indices.tolist(), [round(float(W_dec[fid, i]), 5) for i in top.indices]
            rec["align_l1"] = [round(float(v / w.sum()), 5) for v in top.values]
        with open(os.path.join(out_dir, "f", f"{fid}.html"), "w") as fh:
            fh.write(feature_page(rec, ids[s - 1] if s else None, ids[s + 1] if s + 1 < len(ids) else None, pages))
        fires_on = Counter(c["tokens"][c["pos"]].strip() for c in rec["top"])
        summary.append([fid, rec["frequency"], rec["max"], " ".join(t for t, _ in fires_on.most_common(5))])
        if neuronpedia:
            batch.append(neuronpedia_feature(rec))
        if len(batch) == NEURONPEDIA_BATCH:
            flush()
    flush()
    with open(os.path.join(out_dir, "features.json"), "w") as fh:
        json.dump(summary, fh)
    with open(os.path.join(out_dir, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    with open(os.path.join(out_dir, "style.css"), "w") as fh:
        fh.write(STYLE_CSS)
    freq = torch.tensor([row[1] for row in summary], dtype=torch.float64)
    alive = freq[freq > 0].log10()
    density = "<p>no feature fired</p>"
    if len(alive):
        lo, hi = float(alive.min()), float(alive.max()) + 1e-9
        counts = torch.histc(alive, bins=40, min=lo, max=hi).tolist()
        density = _svg_bars(counts, (f"1e{lo:.1f}", f"1e{hi:.1f} firing frequency"), width=480)
    header = (f'{html.escape(str(meta["model_name"]))} &middot; {html.escape(meta["hook_name"])} &middot; '
              f'{len(ids)} of {meta["d_sae"]} features &middot; {stats.tokens} tokens of {html.escape(str(meta["corpus"]))}'
              f' ({meta["split"]}) &middot; {int((freq == 0).sum())} never fired')
    with open(os.path.join(out_dir, "index.html"), "w") as fh:
        fh.write(INDEX_HTML.replace("%HEADER%", header).replace("%DENSITY%", density)
                 .replace("%FEATURES%", json.dumps(summary).replace("</", "<\\/")))
