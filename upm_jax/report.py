"""The printed results table (per split, mean, and before/after training when present)."""

_COLUMNS = ("rank1", "rank5", "rank10", "rank20", "mAP")


def _rows(summary, prefix=""):
    for name, result in summary.items():
        if name == "initial":
            continue
        for mode in ("paper", "standard"):
            values = [result[mode][c] for c in _COLUMNS]
            yield f"{prefix}{name}", mode, values


def format_results(summary):
    """A fixed-width table of Rank-k and mAP (both AP modes), in percent."""
    header = f"{'':<22}{'AP mode':<10}" + "".join(f"{c:>9}" for c in _COLUMNS)
    lines = [header, "-" * len(header)]
    sections = [("", summary)]
    if "initial" in summary:
        sections = [("initial ", summary["initial"]), ("trained ", summary)]
    for prefix, part in sections:
        for name, mode, values in _rows(part, prefix):
            lines.append(f"{name:<22}{mode:<10}" + "".join(f"{v:>9.2f}" for v in values))
    if "initial" in summary:
        before, after = summary["initial"]["mean"]["paper"], summary["mean"]["paper"]
        lines.append("")
        lines.append(f"training changed Rank-1 by {after['rank1'] - before['rank1']:+.2f} points "
                     f"and mAP by {after['mAP'] - before['mAP']:+.2f} points (paper mode)")
    return "\n".join(lines)
