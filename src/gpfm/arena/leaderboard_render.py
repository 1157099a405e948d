"""Render a leaderboard analysis as Markdown and as one self-contained HTML page (sortable tables, inline PNGs).

Both renderers draw from the same section list (`sections`), so the two files always show the same numbers.
The HTML has no external resources: styles and the table-sorting script are inline and figures are base64 PNGs.
The script marks the page `data-gpfm-ready="1"` once it has wired the tables (tests check this in Chromium).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from gpfm.arena.figures import label

if TYPE_CHECKING:
    from gpfm.arena.leaderboard import Analysis

FIGURE_CAPTIONS = {
    "rank_heatmap": "Rank of every encoder on every task (1 = best; ties share the average rank).",
    "cd_diagram": "Critical-difference diagram: average rank over tasks; encoders joined by a bar are not "
                  "significantly different (Nemenyi test).",
    "average_metric": "Mean primary metric over tasks, with a 95% bootstrap CI over tasks.",
    "radar": "Average rank per task type (outer ring = rank 1).",
}


@dataclass
class Cell:
    text: str
    v: float | str | None = None  # sort key (numbers sort numerically)
    bold: bool = False
    title: str = ""


@dataclass
class Table:
    id: str
    header: list[str]
    rows: list[list[Cell]]
    foot: list[list[Cell]] = field(default_factory=list)
    left: int = 2  # leading text columns (left-aligned)


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    level: int = 2


def _num(x: Any, fmt: str = "{:.3f}") -> Cell:
    if x is None or (isinstance(x, float) and not math.isfinite(x)) or pd.isna(x):
        return Cell("–", None)
    return Cell(fmt.format(float(x)), float(x))


def _p(x: Any) -> Cell:
    if x is None or pd.isna(x):
        return Cell("–", None)
    return Cell("<0.001" if x < 1e-3 else f"{x:.3f}", float(x), bold=bool(x < 0.05))


# --------------------------------------------------------------------------------------------- sections
def sections(a: Analysis, summary: pd.DataFrame) -> list[Section]:
    res = a.results
    n_complete = 0 if a.ranks is None else len(a.ranks)
    intro = Section(f"Leaderboard: {res.suite}", level=1, paragraphs=[
        f"{len(res.tasks)} task(s) x {len(res.encoders)} encoder(s); ranked on {n_complete} task(s) that every "
        "encoder has. Lower rank is better; ties share the average rank."])
    out = [intro, Section("Overall", tables=[_summary_table(a, summary)], paragraphs=_stat_lines(a))]
    if a.ranks is not None:
        out[-1].figures = [f for f in ("rank_heatmap", "cd_diagram", "average_metric", "radar")]
    for cat in dict.fromkeys(a.categories):
        out.append(_category_section(a, cat))
    if a.gaps or res.problems:
        lines = [f"missing: {t} / {e}" for t, e in a.gaps] + [f"skipped: {p}" for p in res.problems]
        out.append(Section("Gaps", paragraphs=lines))
    if a.notes:
        out.append(Section("Notes", paragraphs=list(a.notes)))
    return out


def _summary_table(a: Analysis, s: pd.DataFrame) -> Table:
    cat_cols = [c for c in s.columns if c.startswith("avg_rank_")]
    header = ["#", "Encoder"]
    if a.ranks is not None:
        header += ["Avg rank"] + [label(c[len("avg_rank_"):]) for c in cat_cols] + ["Avg metric [95% CI]",
                                                                                      "Tasks won"]
        if "p_across_tasks" in s.columns:
            header.append(f"P (worse than {a.reference}, across tasks{', Holm' if a.holm else ''})")
    else:
        header += ["Avg metric"]
    header.append("Tasks")
    rows = []
    best = s["avg_rank"].min() if "avg_rank" in s.columns else None
    for i, r in enumerate(s.itertuples(index=False), 1):
        d = r._asdict()
        row = [Cell(str(i), i), Cell(str(d["encoder"]), str(d["encoder"]), bold=d.get("avg_rank") == best)]
        if a.ranks is not None:
            row += [_num(d["avg_rank"], "{:.2f}")] + [_num(d[c], "{:.2f}") for c in cat_cols]
            m = _num(d["avg_metric"])
            m.text += f" [{d['avg_metric_ci_low']:.3f}, {d['avg_metric_ci_high']:.3f}]"
            won = d["tasks_won"]
            row += [m, Cell(f"{won:g}", float(won), title=f"shared ties: {d['tasks_won_shared']:.2f}")]
            if "p_across_tasks" in s.columns:
                row.append(Cell("reference", -1.0) if d["encoder"] == a.reference else _p(d["p_across_tasks"]))
        else:
            row.append(_num(d["avg_metric"]))
        row.append(Cell(str(int(d["n_tasks"])), int(d["n_tasks"])))
        rows.append(row)
    return Table("summary", header, rows)


def _stat_lines(a: Analysis) -> list[str]:
    lines = []
    if a.friedman is not None:
        f = a.friedman
        lines.append(f"Friedman test over {f.n} tasks and {f.k} encoders: chi2 = {f.statistic:.2f}, "
                     f"P = {f.p_value:.3g} (Iman-Davenport F = {f.iman_davenport_f:.2f}, P = "
                     f"{f.iman_davenport_p:.3g}).")
        lines.append(f"Nemenyi critical difference at alpha = {a.alpha:g}: CD = {a.cd:.3f} average-rank units.")
        if a.groups:
            lines.append("Not significantly different: " + "; ".join("{" + ", ".join(g) + "}" for g in a.groups)
                         + ".")
        else:
            lines.append("Every pair of encoders differs by more than the critical difference.")
    if a.ranks is not None:
        lines.append("Tasks won: an encoder tied for first gets the win, so the counts may sum to more than the "
                     "number of tasks (leaderboard.csv's tasks_won_shared splits tied wins instead).")
    if a.pvalues is not None:
        lines.append(f"Per-task P-values: paired bootstrap of the test predictions (the same resamples for "
                     f"every encoder), then a one-sided Wilcoxon signed-rank test of 'encoder worse than "
                     f"{a.reference}' (no continuity correction){'; Holm-adjusted within each task' if a.holm else ''}.")
    return lines


def _category_section(a: Analysis, cat: str) -> Section:
    tasks = [t for t in a.scores.index if a.categories[t] == cat]
    rows_df = a.results.rows.set_index(["task", "encoder"])
    encs = list(a.scores.columns)
    header = ["Task", "Metric"] + encs
    rows = []
    for t in tasks:
        vals = a.scores.loc[t]
        oriented = vals if a.higher[t] else -vals
        best = oriented.max()
        first = rows_df.loc[t].iloc[0]
        name = first["title"] or t
        row = [Cell(name, name, title=t), Cell(str(first["primary_metric"]) + ("" if a.higher[t] else " (lower better)"))]
        for e in encs:
            if (t, e) not in rows_df.index:
                row.append(Cell("missing", None))
                continue
            r = rows_df.loc[(t, e)]
            c = _num(r["value"])
            rank = a.ranks.at[t, e] if a.ranks is not None and t in a.ranks.index else None
            if rank is not None:
                c.text += f" ({rank:g})"
            c.bold = bool(oriented[e] == best)
            c.title = f"95% CI [{r['ci_low']:.3f}, {r['ci_high']:.3f}], {int(r['n_folds'])} fold(s)"
            row.append(c)
        rows.append(row)
    foot = []
    if a.avg_ranks is not None and cat in a.avg_ranks.index:
        foot.append([Cell("Average rank"), Cell("")] + [_num(a.avg_ranks.at[cat, e], "{:.2f}") for e in encs])
    sec = Section(f"{label(cat)} ({len(tasks)} task{'s' if len(tasks) != 1 else ''})",
                  tables=[Table(f"cat-{cat}", header, rows, foot)])
    if a.pvalues is not None:
        pv = a.pvalues[a.pvalues["task"].isin(tasks) & (a.pvalues["encoder_b"] == a.reference)]
        if len(pv):
            col = "p_holm" if a.holm else "p"
            wide = pv.pivot(index="task", columns="encoder_a", values=col).reindex([t for t in tasks if t in set(pv["task"])])
            others = [e for e in encs if e in wide.columns]
            title = {t: (rows_df.loc[t].iloc[0]["title"] or t) for t in wide.index}
            prow = [[Cell(title[t], title[t], title=t)] + [_p(wide.at[t, e]) for e in others] for t in wide.index]
            sec.tables.append(Table(f"p-{cat}", ["Task"] + [f"P({e} worse than {a.reference})" for e in others],
                                    prow, left=1))
    return sec


# ---------------------------------------------------------------------------------------------- markdown
def _md_cell(c: Cell) -> str:
    t = c.text.replace("|", "\\|")
    if c.title and c.title.startswith("95% CI"):
        t += " " + c.title.rsplit(",", 1)[0].replace("95% CI ", "")
    return f"**{t}**" if c.bold else t


def render_markdown(a: Analysis, summary: pd.DataFrame, figure_paths: dict[str, str]) -> str:
    lines: list[str] = []
    for s in sections(a, summary):
        lines += ["#" * s.level + " " + s.title, ""]
        for t in s.tables:
            lines.append("| " + " | ".join(h.replace("|", "\\|") for h in t.header) + " |")
            lines.append("|" + "---|" * len(t.header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows + t.foot]
            lines.append("")
        lines += [("- " if s.level > 1 else "") + p for p in s.paragraphs]
        if s.paragraphs:
            lines.append("")
        for f in s.figures:
            if f in figure_paths:
                lines += [f"![{FIGURE_CAPTIONS[f]}]({figure_paths[f]})", ""]
    return "\n".join(lines).rstrip() + "\n"


# -------------------------------------------------------------------------------------------------- html
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1300px;
padding:0 1em;color:#222}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.88em}th,td{border:1px solid #ddd;padding:4px 8px;
text-align:right;white-space:nowrap}td:first-child,th:first-child,.l2 td:nth-child(2),.l2 th:nth-child(2)
{text-align:left}th{background:#f3f5f8;cursor:pointer;user-select:none}th[data-dir=asc]::after
{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
tfoot td{background:#fafafa;font-style:italic}figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}.wrap{overflow-x:auto}"""

_JS = """(function(){
function key(row,i){var c=row.cells[i];if(!c)return "";var v=c.getAttribute("data-v");
if(v!==null&&v!==""&&!isNaN(Number(v)))return Number(v);return v===null?c.textContent.trim().toLowerCase():v;}
function cmp(x,y){var nx=typeof x==="number",ny=typeof y==="number";if(x===""&&y!=="")return 1;
if(y===""&&x!=="")return -1;if(nx&&ny)return x-y;if(nx)return -1;if(ny)return 1;return x<y?-1:(x>y?1:0);}
function sortBy(table,i,th){var asc=th.getAttribute("data-dir")!=="asc";
var hs=table.tHead.rows[0].cells;for(var j=0;j<hs.length;j++)hs[j].removeAttribute("data-dir");
th.setAttribute("data-dir",asc?"asc":"desc");var body=table.tBodies[0];
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var c=cmp(key(a,i),key(b,i));if(key(a,i)===""||key(b,i)==="")return c;return asc?c:-c;});
rows.forEach(function(r){body.appendChild(r);});}
var tables=document.querySelectorAll("table.sortable");
Array.prototype.forEach.call(tables,function(t){var hs=t.tHead.rows[0].cells;
Array.prototype.forEach.call(hs,function(th,i){th.addEventListener("click",function(){sortBy(t,i,th);});});});
window.gpfmSort=function(id,i){var t=document.getElementById(id);sortBy(t,i,t.tHead.rows[0].cells[i]);};
document.documentElement.setAttribute("data-gpfm-ready","1");})();"""


def _h(s: str) -> str:
    return html.escape(str(s), quote=True)


def _html_cell(c: Cell, tag: str = "td") -> str:
    attrs = "" if c.v is None else f' data-v="{_h(c.v)}"'
    attrs += f' title="{_h(c.title)}"' if c.title else ""
    body = f"<b>{_h(c.text)}</b>" if c.bold else _h(c.text)
    return f"<{tag}{attrs}>{body}</{tag}>"


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_h(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in t.rows)
    foot = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in t.foot)
    cls = "sortable l2" if t.left >= 2 else "sortable"
    return (f'<div class="wrap"><table class="{cls}" id="{_h(t.id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody>" + (f"<tfoot>{foot}</tfoot>" if foot else "") + "</table></div>")


def render_html(a: Analysis, summary: pd.DataFrame, figs: dict[str, bytes]) -> str:
    parts = []
    for s in sections(a, summary):
        parts.append(f"<h{s.level}>{_h(s.title)}</h{s.level}>")
        parts += [_html_table(t) for t in s.tables]
        if s.paragraphs and s.level == 1:
            parts += [f"<p>{_h(p)}</p>" for p in s.paragraphs]
        elif s.paragraphs:
            items = "".join(f"<li>{_h(p)}</li>" for p in s.paragraphs)
            parts.append(f"<ul>{items}</ul>")
        for f in s.figures:
            if f in figs:
                b64 = base64.b64encode(figs[f]).decode()
                parts.append(f'<figure id="fig-{f}"><img alt="{_h(f)}" src="data:image/png;base64,{b64}">'
                             f"<figcaption>{_h(FIGURE_CAPTIONS[f])}</figcaption></figure>")
    title = _h(f"gpfm leaderboard: {a.results.suite}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + f"\n<script>{_JS}</script>\n</body></html>\n")
