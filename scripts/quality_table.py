"""The table of docs/QUALITY.md from the JSON of `qins parity --suite full --json F`.
usage: python3 scripts/quality_table.py docs/quality/suite-full.json"""
import json, os, sys

doc = json.load(open(sys.argv[1]))
rows = doc["results"]
print("| model | bits/weight | A min cos | B match | B drift (pts) | C mean KL | C top-1 / top-10 | D PPL (ref -> model) | D dPPL | "
      "E match per context | E worst drift | bars failed |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    name = os.path.basename(r["model"].rstrip("/"))
    a, b, c, d, e = r.get("a"), r.get("b"), r.get("c"), r.get("d"), r.get("e") or []
    cells = [
        f"{a['bits_per_weight']:.2f}" if a else "-",
        f"{a['min_cosine']:.6f}" if a else "-",
        f"{100 * b['mean_match']:.1f}%" if b else "-",
        f"{b['drift_points']:+.1f}" if b else "-",
        f"{c['mean_kl']:.4f}" if c else "-",
        f"{100 * c['top1']:.1f}% / {100 * c['top10']:.1f}%" if c else "-",
        f"{d['ppl_ref']:.3f} -> {d['ppl']:.3f}" if d else "-",
        f"{d['delta']:+.3f} ({100 * d['delta_rel']:+.2f}%)" if d else "-",
        " / ".join(f"{100 * x['match_frac']:.1f}%" for x in e) if e else "-",
        f"{min(x['drift_points'] for x in e):+.1f}" if e else "-",
        ", ".join(f"{x['test']} {x['bar'].split()[0].strip('|')}" for x in r["bars"] if not x["pass"]) or "none",
    ]
    print(f"| {name} | " + " | ".join(cells) + " |")
