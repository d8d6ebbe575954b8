"""``actrain report``: one Markdown + self-contained HTML report for a set of runs.

Runs are grouped by configuration (everything in ``config.json`` except the seed and settings
that do not change what is trained), seeds being the repeats; every number in a table is the
mean ± sample standard deviation (n - 1) over the seeds of a group (marked ``[k/n]`` where only k
of the row's n seeds have it; results of one attack made with different settings are columns of
their own, never one mean). Sections appear for
whatever the runs hold: training curves (``metrics.jsonl``), evaluation tables (``eval/*.json``
from ``actrain eval``, else the last during-training evaluation), parameter sweeps (Table 1),
transfer (Table 3), epsilon sweeps (Table 5), sanity checks and the analyses of
``actrain analyze`` (Figures 3 and 4). Every table lists the commands behind its numbers.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
import shlex
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from actrain.analysis import evalread
from actrain.analysis.runs import Run, eval_command, train_command
from actrain.errors import UsageError

METHOD_NAMES = {"natural": "Natural", "madry": "Madry", "trades": "TRADES", "act": "ACT"}
METHOD_ORDER = {"natural": 0, "madry": 1, "trades": 2, "act": 3}
A_NAT = "A_nat"
MIN_PERT = "Min. perturbation"


# ---- numbers ----------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is 0."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_ms(values: Sequence[float], digits: int = 2) -> str:
    """``85.11 ± 0.19`` over repeats, the plain value for one repeat, ``–`` for none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "–"
    m, s = mean_std(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_of(values: Sequence[float], n: int, digits: int = 2) -> str:
    """:func:`fmt_ms`, marked ``[k/n]`` where only k of the row's n seeds have the number: a
    mean of fewer seeds than the row's "Seeds" says must not pass for a mean of all of them."""
    k = sum(1 for v in values if v is not None and not math.isnan(v))
    text = fmt_ms(values, digits)
    return f"{text} [{k}/{n}]" if 0 < k < n else text


#: The caption's key to :func:`fmt_of`'s mark.
PARTIAL_NOTE = (
    " [k/n]: the mean over the k of the row's n seeds that have this result (the other seeds"
    " lack it)."
)


# ---- document blocks --------------------------------------------------------------------------
@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""
    commands: list[str] = field(default_factory=list)
    name: str = ""


@dataclass
class Figure:
    file: str  # relative to the report folder
    caption: str


Block = Heading | Para | Table | Figure


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Table):
            if b.caption:
                out += [f"*{b.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
            out.append("|" + "|".join("---" for _ in b.headers) + "|")
            for r in b.rows:
                out.append("| " + " | ".join(_md_cell(c) for c in r) + " |")
            out.append("")
            if b.commands:
                label = "Command" if len(b.commands) == 1 else "Commands"
                out += [f"{label} behind these numbers:", "", "```bash", *b.commands, "```", ""]
        elif isinstance(b, Figure):
            out += [f"![{b.caption}]({b.file})", "", f"*{b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def _inline_html(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    return t


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #ddd;padding-bottom:.2em}
h2{margin-top:1.8em;border-bottom:1px solid #eee}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-style:italic;padding:.3em 0;color:#444}
code,pre{background:#f6f6f6;border-radius:3px}pre{padding:.6em;overflow-x:auto;font-size:.85em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-style:italic;color:#444;font-size:.9em}
details summary{cursor:pointer;color:#555;font-size:.9em}
"""


def render_html(blocks: list[Block], root: Path, title: str) -> str:
    """Self-contained HTML: CSS inline, every figure embedded as a base64 PNG data URI."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            out.append("<table>")
            if b.caption:
                out.append(f"<caption>{_inline_html(b.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in b.headers) + "</tr>")
            for r in b.rows:
                out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
            out.append("</table>")
            if b.commands:
                label = "Command" if len(b.commands) == 1 else f"Commands ({len(b.commands)})"
                cmds = html.escape("\n".join(b.commands))
                out.append(f"<details><summary>{label}</summary><pre>{cmds}</pre></details>")
        elif isinstance(b, Figure):
            data = base64.b64encode((root / b.file).read_bytes()).decode("ascii")
            cap = _inline_html(b.caption)
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                f"<figcaption>{cap}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---- grouping ---------------------------------------------------------------------------------
@dataclass
class Group:
    runs: list[Run]
    varying: dict[str, Any] = field(default_factory=dict)
    # the data set's name in the report and in file names (:func:`_data_keys`,
    # :func:`_data_slugs`; set by :func:`group_runs`): two ImageFolder folders are two data sets
    data: str = ""
    data_slug: str = ""

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def method(self) -> str:
        return self.first.method

    @property
    def dataset(self) -> str:
        return self.first.dataset

    @property
    def arch(self) -> str:
        return self.first.arch

    @property
    def family(self) -> tuple[str, str, str]:
        return (self.method, self.data or self.dataset, self.arch)

    @property
    def method_name(self) -> str:
        return METHOD_NAMES.get(self.method, self.method)

    def _title(self, data: str) -> str:
        extra = ", ".join(f"{k}={_fmt_value(v)}" for k, v in self.varying.items())
        base = f"{self.method_name} · {data} · {self.arch}"
        return f"{base} · {extra}" if extra else base

    @property
    def label(self) -> str:
        return self._title(self.data or self.dataset)

    @property
    def file_label(self) -> str:
        """:attr:`label` naming the data set by its file-name part (a folder's full path,
        slashes turned into dashes, could name two folders alike)."""
        return self._title(self.data_slug or self.data or self.dataset)

    @property
    def short(self) -> str:
        extra = ", ".join(f"{k}={_fmt_value(v)}" for k, v in self.varying.items())
        return f"{self.method_name} ({extra})" if extra else self.method_name

    @property
    def roles(self) -> list[str]:
        return self.first.roles

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def group_runs(runs: list[Run]) -> list[Group]:
    """Group by configuration without the seed; label groups of one (method, data set, arch)
    family by the settings in which they differ (e.g. ``alpha=0.5``). Two ImageFolder folders
    are two data sets (``imagefolder (birds)``), not one family that differs in ``data_dir``."""
    by_key: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(run.semantic_config(), sort_keys=True, default=str)
        by_key.setdefault(key, Group(runs=[])).runs.append(run)
    groups = list(by_key.values())
    data_of = _data_keys(groups)
    slugs = _data_slugs(data_of.values())
    for g in groups:
        g.data = data_of[id(g)]
        g.data_slug = slugs[g.data]
    families: dict[tuple[str, str, str], list[Group]] = {}
    for g in groups:
        families.setdefault(g.family, []).append(g)
    for members in families.values():
        if len(members) < 2:
            continue
        configs = [m.first.semantic_config() for m in members]
        keys = sorted({k for c in configs for k in c})
        differing = [
            k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1
        ]
        for m, c in zip(members, configs, strict=True):
            m.varying = {k: c.get(k) for k in differing}
    for g in groups:
        g.runs.sort(key=lambda r: r.seed)
    groups.sort(
        key=lambda g: (
            g.data,
            g.arch,
            METHOD_ORDER.get(g.method, 9),
            g.method,
            [_sort_key(v) for v in g.varying.values()],
        )
    )
    return groups


def _sort_key(v: Any) -> tuple[int, Any]:
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v))


# ---- scores of a run --------------------------------------------------------------------------
_EVAL_CACHE: dict[int, evalread.EvalData] = {}


def run_eval(run: Run) -> evalread.EvalData:
    key = id(run)
    if key not in _EVAL_CACHE:
        items = [evalread.read_eval(e, e.get("_file", "")) for e in run.evals]
        _EVAL_CACHE[key] = evalread.merge(items)
    return _EVAL_CACHE[key]


def _attack_order(name: str) -> tuple[int, int, str]:
    m = re.match(r"PGD-(\d+)", name)
    if m:
        return (0, int(m.group(1)), name)
    return (1, 0, name)


#: What makes two results of one attack name one attack: runs attacked with different
#: settings are not seeds of one number (their mean mixes two attacks).
ATTACK_SETTINGS = ("eps", "step_size", "restarts")
Setting = tuple[Any, ...]


def _eval_picks(run: Run, role: str) -> dict[str, dict[str, Any]]:
    """The result that counts of each attack of ``actrain eval`` (an attack record of
    :mod:`evalread` per attack name)."""
    attacks = [a for a in run_eval(run).attacks if a["role"] == role]
    train_eps = float(run.config.get("eps", 0.031))
    by_name: dict[str, list[dict[str, Any]]] = {}
    for a in attacks:
        by_name.setdefault(a["name"], []).append(a)
    picks: dict[str, dict[str, Any]] = {}
    for name in sorted(by_name, key=_attack_order):
        # at the training eps (or nearest), the most complete measurement: most images, then
        # most restarts (it took the first file's, 16 images with 1 restart beside 32 with 2);
        # of equally complete ones (another step size) the strongest, not the first file's
        picks[name] = min(
            by_name[name],
            key=lambda a: (
                abs((a["eps"] or train_eps) - train_eps),
                -(a["n"] or 0),
                -(a["restarts"] or 1),
                a["robust_acc"] if a["robust_acc"] is not None else math.inf,
            ),
        )
    return picks


def eval_scores(run: Run, role: str) -> dict[str, float]:
    """Scores of ``actrain eval`` results: A_nat, one column per attack, minimum perturbation."""
    ev = run_eval(run)
    attacks = [a for a in ev.attacks if a["role"] == role]
    scores: dict[str, float] = {}
    if not attacks:
        return scores
    cleans = [a for a in attacks if a["clean_acc"] is not None]
    if cleans:
        best = max(cleans, key=lambda a: a["n"] or 0)
        scores[A_NAT] = best["clean_acc"]
    for name, pick in _eval_picks(run, role).items():
        scores[name] = pick["robust_acc"]
    for m in ev.min_pert:
        if m["role"] == role:
            scores[f"{MIN_PERT} ({m['name']})" if m["name"] else MIN_PERT] = m["value"]
    return scores


def eval_settings(run: Run, role: str) -> dict[str, Setting]:
    """The attack settings (:data:`ATTACK_SETTINGS`) of each result :func:`eval_scores` took;
    an unrecorded eps is the training eps and unrecorded restarts 1, as the pick reads them."""
    train_eps = float(run.config.get("eps", 0.031))

    def norm(v: Any) -> Any:
        return round(float(v), 8) if isinstance(v, (int, float)) else v

    return {
        name: (
            norm(a["eps"] if a["eps"] is not None else train_eps),
            norm(a.get("step_size")),
            a["restarts"] if a["restarts"] is not None else 1,
        )
        for name, a in _eval_picks(run, role).items()
    }


def _setting_label(setting: Setting, keys: Sequence[int]) -> str:
    """``step 0.003`` / ``eps 8/255, 5 restarts``: the settings at ``keys`` in words."""
    parts = []
    for i in keys:
        v = setting[i]
        if ATTACK_SETTINGS[i] == "eps":
            parts.append(f"eps {_eps_label(v)}" if v is not None else "eps unrecorded")
        elif ATTACK_SETTINGS[i] == "step_size":
            parts.append(f"step {v:.4g}" if v is not None else "step unrecorded")
        else:
            parts.append(f"{v} restart" + ("" if v == 1 else "s"))
    return ", ".join(parts)


def table_scores(
    pairs: Sequence[tuple[Run, str]], source: str
) -> tuple[list[dict[str, float]], dict[str, dict[str, list[str]]]]:
    """Scores of each (run, model) of one table. Where the results of one attack that the runs
    hold were made with different settings (:data:`ATTACK_SETTINGS`), each setting is a column
    of its own (``PGD-20 (step 0.003)``), as the runs would have averaged two attacks as seeds
    of one number. Returns the scores and, per split attack, its settings with the runs of each.
    """
    out = [scores(r, role, source) for r, role in pairs]
    if source != "eval":  # the during-training protocol: the caption gives each run's settings
        return out, {}
    settings = [eval_settings(r, role) for r, role in pairs]
    seen: dict[str, list[Setting]] = {}
    for st in settings:
        for name, setting in st.items():
            if setting not in seen.setdefault(name, []):
                seen[name].append(setting)
    mixed: dict[str, dict[str, list[str]]] = {}
    for name, found in seen.items():
        if len(found) < 2:
            continue
        keys = [i for i in range(len(ATTACK_SETTINGS)) if len({str(f[i]) for f in found}) > 1]
        mixed[name] = {}
        for (run, _), sc, st in zip(pairs, out, settings, strict=True):
            if name in st and name in sc:
                label = _setting_label(st[name], keys)
                sc[f"{name} ({label})"] = sc.pop(name)
                names = mixed[name].setdefault(label, [])
                if run.name not in names:
                    names.append(run.name)
    return out, mixed


def mixed_attacks_note(mixed: dict[str, dict[str, list[str]]]) -> Para | None:
    """The paragraph that says which attack was split into a column per setting, and why."""
    if not mixed:
        return None
    parts = [
        f"{name} " + ", ".join(f"at {label} ({', '.join(runs)})" for label, runs in by.items())
        for name, by in mixed.items()
    ]
    return Para(
        "**Different attack settings:** "
        + "; ".join(parts)
        + ". Results of different attacks are not averaged as seeds of one number: each setting"
        " is a column of its own (`actrain eval` the runs alike to get one column)."
    )


def eval_sizes(run: Run, role: str) -> dict[str, int | None]:
    """The number of test images behind each result :func:`eval_scores` took."""
    return {name: a["n"] for name, a in _eval_picks(run, role).items()}


def mixed_sizes_note(
    pairs: Sequence[tuple[Run, str]], rows: Sequence[tuple[Group, str]]
) -> Para | None:
    """The paragraph that names the rows whose seeds were attacked on different numbers of test
    images: their mean and std mix subset noise with seed noise, so the table must say so."""
    of_run = {(id(r), role): eval_sizes(r, role) for r, role in pairs}
    parts = []
    for g, role in rows:
        sizes = [of_run[(id(r), role)] for r in g.runs]
        for name in sorted({k for s in sizes for k in s}, key=_attack_order):
            found = sorted({s[name] for s in sizes if name in s}, key=lambda n: n or 0)
            if len(found) > 1:
                label = g.short if role == "g" else f"{g.short} ({role.upper()})"
                counts = ", ".join("unrecorded" if n is None else str(n) for n in found)
                parts.append(f"{label} {name} ({counts} images)")
    if not parts:
        return None
    return Para(
        "**Different numbers of test images:** "
        + "; ".join(parts)
        + ". These means average seeds attacked on test sets of different sizes, so their std"
        " mixes subset noise with seed noise (`actrain eval` the runs alike to compare them)."
    )


def metric_scores(run: Run, role: str) -> dict[str, float]:
    """Scores of the last during-training evaluation in ``metrics.jsonl``."""
    rec = run.last_eval_record()
    if rec is None:
        return {}
    scores: dict[str, float] = {}
    for prefix in ("test", "val"):
        if f"{prefix}_clean_acc_{role}" in rec:
            scores[A_NAT] = rec[f"{prefix}_clean_acc_{role}"]
            for k, v in rec.items():
                m = re.fullmatch(rf"{prefix}_pgd(\d+)_acc_{role}", k)
                if m:
                    scores[f"PGD-{m.group(1)}"] = v
            break
    return scores


def scores(run: Run, role: str, source: str) -> dict[str, float]:
    return eval_scores(run, role) if source == "eval" else metric_scores(run, role)


def _columns(dicts: list[dict[str, float]]) -> list[str]:
    names = {k for d in dicts for k in d}
    mins = sorted(n for n in names if n.startswith(MIN_PERT))
    attacks = sorted((n for n in names if n != A_NAT and n not in mins), key=_attack_order)
    return ([A_NAT] if A_NAT in names else []) + attacks + mins


def primary_robust(columns: list[str]) -> str | None:
    """The paper's A_rob column: PGD-20 if present, else the first robust column."""
    robust = [c for c in columns if c != A_NAT and not c.startswith(MIN_PERT)]
    if "PGD-20" in robust:
        return "PGD-20"
    # one setting of a PGD-20 split by attack settings (table_scores), not the margin loss's
    split = [c for c in robust if re.fullmatch(r"PGD-20 \((eps|step|\d+ restart)[^)]*\)", c)]
    if split:
        return split[0]
    return robust[0] if robust else None


def _probe_setting(probe: dict[str, Any]) -> str:
    """What makes two random-label probes comparable, as the caption states it."""
    return (
        f"MLP {probe['hidden']}, Adam lr {probe['lr']}, batch {probe['batch_size']},"
        f" {probe['epochs']} epochs, seed {probe['seed']}, {probe['n']} images"
        + (", standardised features" if probe.get("standardize") else "")
    )


def _metrics_protocol(runs: list[Run]) -> str:
    """The during-training evaluation's settings; where runs differ in them, each setting
    with the runs it holds for (the caption described the first run's alone)."""
    parts: dict[str, list[str]] = {}
    for r in runs:
        parts.setdefault(_one_protocol([r]), []).append(r.path.name)
    if len(parts) == 1:
        return next(iter(parts))
    return "; ".join(f"{text} ({', '.join(names)})" for text, names in parts.items())


def _one_protocol(runs: list[Run]) -> str:
    cfg = runs[0].config
    split = "validation" if cfg.get("val_size") else "test"
    step = cfg.get("eval_step_size") or cfg.get("step_size")
    counts = {
        rec["eval_images"]
        for r in runs
        for rec in [next((m for m in reversed(r.metrics) if "eval_images" in m), {})]
        if "eval_images" in rec
    }
    if counts:  # recorded by the run (since the twelfth session)
        size = " or ".join(str(n) for n in sorted(counts))
    else:  # older runs: --eval-size caps the count (a smaller test set has fewer)
        size = f"up to {cfg['eval_size']}" if cfg.get("eval_size") else "all"
    return (
        f"last during-training evaluation in `metrics.jsonl`: PGD with 1 random start, "
        f"eps {cfg.get('eps')}, step {step}, on {size} {split} images"
    )


SECTIONS = (
    "runs",
    "eval",
    "examples",
    "sweeps",
    "transfer",
    "eps_sweep",
    "sanity",
    "analyses",
    "curves",
)


# ---- the report -------------------------------------------------------------------------------
class ReportBuilder:
    def __init__(
        self,
        runs: list[Run],
        out_dir: Path,
        title: str,
        command: str | None,
        sections: Sequence[str] = SECTIONS,
        previous: dict[str, Any] | None = None,
    ) -> None:
        unknown = [s for s in sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown report sections {unknown} (choices: {SECTIONS})")
        self.sections = list(sections)
        self.runs = runs
        self.out = out_dir
        self.title = title
        self.command = command
        self.groups = group_runs(runs)
        self.blocks: list[Block] = []
        self.figures: list[Path] = []
        self.tables: dict[str, dict[str, Any]] = {}
        self.previous = previous or {}  # the last report's manifest: which files it wrote
        self._taken: set[str] = set()

    # helpers
    def figure_path(self, name: str) -> Path:
        """Where figure ``name`` goes: :func:`figure_name` in the report folder."""
        chosen = figure_name(self.out, name, self.previous, self._taken)
        self._taken.add(chosen)
        return self.out / chosen

    def add_table(self, table: Table) -> None:
        self.blocks.append(table)
        if table.name:
            self.tables[table.name] = {"headers": table.headers, "rows": table.rows}

    def add_figure(self, path: Path, caption: str) -> None:
        self.figures.append(path)
        self.blocks.append(Figure(path.name, caption))

    def train_commands(self, runs: list[Run]) -> list[str]:
        cmds: list[str] = []
        for r in runs:
            sweep = r.sweep or {}
            entry = next(
                (e for e in sweep.get("runs", []) if Path(e.get("out", "")).name == r.path.name),
                {},
            )
            cmd = entry.get("command") or sweep.get("command") or train_command(r.config)
            if r.processes > 1 and not entry.get("command") and not sweep.get("command"):
                cmd = cmd.replace(
                    "actrain train", f"torchrun --nproc_per_node {r.processes} -m actrain train", 1
                )
            if cmd not in cmds:
                cmds.append(cmd)
        return cmds

    def eval_commands(self, runs: list[Run]) -> list[str]:
        cmds: list[str] = []
        for r in runs:
            ev = run_eval(r)
            found = list(ev.commands)
            if not found:
                found = [eval_command(r, e) for e in r.evals]
            for c in found:
                if c not in cmds:
                    cmds.append(c)
        return cmds

    def slug(self, group: Group) -> str:
        """A file-name part for ``group``: its label (the data set by its file-name part),
        shortened with a hash of the whole label where long (cut alone, two configurations
        shared one figure file)."""
        label = getattr(group, "file_label", group.label)
        s = re.sub(r"[^A-Za-z0-9._=-]+", "-", label.replace(" · ", "_")).strip("-")
        if len(s) <= 80:
            return s
        digest = hashlib.sha1(label.encode()).hexdigest()[:8]
        return f"{s[:71]}-{digest}"

    # sections
    def build(self) -> list[Block]:
        from actrain import __version__

        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.blocks.append(Heading(self.title, 1))
        self.blocks.append(
            Para(
                f"{len(self.runs)} runs in {len(self.groups)} configurations; generated {now} by "
                f"actrain {__version__}. Numbers are mean ± sample standard deviation over the "
                "seeds of a configuration (a single value where there is one seed). Accuracies "
                "in percent."
            )
        )
        if self.command:
            self.blocks.append(Para(f"Report command: `{self.command}`"))
        for name in self.sections:
            getattr(self, f"section_{name}")()
        return self.blocks

    def section_runs(self) -> None:
        self.blocks.append(Heading("Runs"))
        rows = []
        for g in self.groups:
            epochs = [
                str(max(len(r.metrics), int((r.final or {}).get("epochs", 0))))
                + ("" if r.finished else " (unfinished)")
                + (
                    f" (weights of epoch {r.final['final_weights_epoch']}: overfitting guard)"
                    if r.final and r.final.get("final_weights_epoch")
                    else ""
                )
                for r in g.runs
            ]
            rows.append(
                [
                    g.label,
                    "+".join(x.upper() for x in g.roles),
                    ", ".join(str(s) for s in g.seeds),
                    ", ".join(sorted(set(epochs))),
                    ", ".join(str(r.path) for r in g.runs),
                ]
            )
        self.add_table(
            Table(
                ["Configuration", "Models", "Seeds", "Epochs", "Run folders"],
                rows,
                commands=self.train_commands(self.runs),
                name="runs",
            )
        )
        repeated = [
            (g, s) for g in self.groups for s in sorted(set(g.seeds)) if g.seeds.count(s) > 1
        ]
        if repeated:
            self.blocks.append(
                Para(
                    "**Repeated seeds:** "
                    + "; ".join(
                        f"{g.label}: seed {n} {g.seeds.count(n)} times" for g, n in repeated
                    )
                    + " (runs of one seed are no independent repeats; the std counts them as such)."
                )
            )

    def _score_table(self, source: str) -> tuple[Table, Para | None] | None:
        """Table 2: a row per (configuration, model), a column per score; with the note on
        attacks split by their settings (:func:`table_scores`)."""
        pairs = [(r, role) for g in self.groups for role in g.roles for r in g.runs]
        table, mixed = table_scores(pairs, source)
        of = {(id(r), role): sc for (r, role), sc in zip(pairs, table, strict=True)}
        rows_data: list[tuple[Group, str, list[dict[str, float]]]] = []
        for g in self.groups:
            for role in g.roles:
                per_run = [s for s in (of[(id(r), role)] for r in g.runs) if s]
                if per_run:
                    rows_data.append((g, role, per_run))
        if not rows_data:
            return None
        cols = _columns([s for _, _, runs in rows_data for s in runs])
        rows = []
        partial = False
        for g, role, per_run in rows_data:
            defense = g.short if role == "g" else f"{g.short} (F)"
            if g.method == "act" and role == "g" and len(g.roles) > 1:
                defense = f"{g.short} (G)"
            cells = [g.arch, g.data, defense]
            n = len(per_run)  # the seeds with results of this model; each cell says if fewer
            for c in cols:
                digits = 5 if c.startswith(MIN_PERT) else 2
                vals = [s[c] for s in per_run if c in s]
                partial |= 0 < len(vals) < n
                cells.append(fmt_of(vals, n, digits))
            cells.append(str(n))
            rows.append(cells)
        headers = ["Architecture", "Dataset", "Defense"]
        headers += [c if c == A_NAT or c.startswith(MIN_PERT) else f"A_rob {c}" for c in cols] + [
            "Seeds"
        ]
        notes = [mixed_attacks_note(mixed)]
        if source == "eval":
            notes.append(mixed_sizes_note(pairs, [(g, role) for g, role, _ in rows_data]))
        text = " ".join(p.text for p in notes if p is not None)
        return Table(headers, rows, caption=PARTIAL_NOTE if partial else ""), (
            Para(text) if text else None
        )

    def section_eval(self) -> None:
        has_eval = any(r.evals for r in self.runs)
        if has_eval:
            made = self._score_table("eval")
            if made is not None:
                t, note = made
                self.blocks.append(Heading("Evaluation (Table 2 layout)"))
                t.caption = (
                    "From the evaluation results in each run's `eval/` folder (`actrain eval`); "
                    "A_rob columns are robust accuracy under each attack, minimum perturbation "
                    "in L-inf units." + t.caption
                )
                t.commands = self.eval_commands([r for r in self.runs if r.evals])
                t.name = "table2_eval"
                if note is not None:
                    self.blocks.append(note)
                self.add_table(t)
        foreign = [(r, f, why) for r in self.runs for f, why in r.foreign_evals]
        if foreign:
            self.blocks.append(
                Para("**Left out:** " + "; ".join(f"`{f}` ({why})" for _, f, why in foreign) + ".")
            )
        made = self._score_table("metrics")
        if made is not None:
            t = made[0]
            title = "During-training evaluation" if has_eval else "Evaluation (Table 2 layout)"
            self.blocks.append(Heading(title))
            t.caption = f"From the {_metrics_protocol(self.runs)}." + t.caption
            t.commands = self.train_commands(self.runs)
            t.name = "table2_metrics"
            self.add_table(t)
            if not has_eval:
                self.blocks.append(
                    Para(
                        "No `eval/` results were found in these runs; for the paper's protocol "
                        "(PGD-20/100/1000 with 5 restarts, step 0.003) run `actrain eval RUN "
                        "--json RUN/eval/pgd20.json` and report again."
                    )
                )

    def section_examples(self) -> None:
        """Fig. 2: minimal adversarial examples, when ``actrain eval --save-examples`` made them."""
        import shutil

        found = []
        for g in self.groups:
            for r in g.runs:
                for e in r.evals:
                    png = e.get("examples_png")
                    if isinstance(png, str):
                        where = [Path(png), r.path / png, Path(e.get("_file", ".")).parent / png]
                        src = next((c for c in where if c.is_file()), None)
                        if src is not None:
                            found.append((g, r, str(e.get("model", "g")), src))
        if not found:
            return
        self.blocks.append(Heading("Minimal adversarial examples (Fig. 2)"))
        for g, r, role, src in found:
            dest = self.figure_path(f"examples-{self.slug(g)}-s{r.seed}-{role}.png")
            shutil.copyfile(src, dest)
            self.add_figure(dest, f"{g.short} [{role.upper()}], seed {r.seed}: {src.name}")

    def section_sweeps(self) -> None:
        families: dict[tuple[str, str, str], list[Group]] = {}
        for g in self.groups:
            families.setdefault(g.family, []).append(g)
        first = True
        for fam, members in families.items():
            if len(members) < 2 or not members[0].varying:
                continue
            runs = [r for m in members for r in m.runs]
            source = "eval" if all(eval_scores(r, "g") for r in runs) else "metrics"
            keys = list(members[0].varying)
            roles = members[0].roles
            pairs = [(r, role) for r in runs for role in roles]
            all_scores, mixed = table_scores(pairs, source)
            of = {(id(r), role): sc for (r, role), sc in zip(pairs, all_scores, strict=True)}
            rob = primary_robust(_columns(all_scores))
            partial = False
            headers = list(keys)
            for role in roles:
                headers += [f"{role.upper()} A_nat", f"{role.upper()} A_rob ({rob or '–'})"]
            headers.append("Seeds")
            rows = []
            plot_lines: dict[str, tuple[list[float], list[float]]] = {}
            xs: list[float] = []
            for m in members:
                cells = [_fmt_value(m.varying[k]) for k in keys]
                x = m.varying[keys[0]]
                if isinstance(x, (int, float)):
                    xs.append(float(x))
                for role in roles:
                    per = [of[(id(r), role)] for r in m.runs]
                    for col, label in ((A_NAT, "A_nat"), (rob, "A_rob")):
                        vals = [s[col] for s in per if col in s]
                        partial |= 0 < len(vals) < len(m.runs)
                        cells.append(fmt_of(vals, len(m.runs)))
                        mean, std = mean_std(vals)
                        line = plot_lines.setdefault(f"{role.upper()} {label}", ([], []))
                        line[0].append(mean)
                        line[1].append(std)
                cells.append(str(len(m.runs)))
                rows.append(cells)
            if first:
                self.blocks.append(Heading("Parameter sweeps (Table 1 layout)"))
                first = False
            method, dataset, arch = fam
            file_data = members[0].data_slug
            where = "evaluation results in `eval/`" if source == "eval" else _metrics_protocol(runs)
            self.blocks.append(
                Heading(
                    f"{METHOD_NAMES.get(method, method)} · {dataset} · {arch}: {', '.join(keys)}", 3
                )
            )
            note = mixed_attacks_note(mixed)
            if note is not None:
                self.blocks.append(note)
            self.add_table(
                Table(
                    headers,
                    rows,
                    caption=f"Clean and robust accuracy of each model per {', '.join(keys)}; "
                    f"from the {where}." + (PARTIAL_NOTE if partial else ""),
                    commands=(self.eval_commands(runs) if source == "eval" else [])
                    + self.train_commands(runs),
                    name=f"sweep_{method}_{file_data}_{arch}_{'_'.join(keys)}",
                )
            )
            if len(keys) == 1 and len(xs) == len(members) and len(xs) > 1:
                from actrain.analysis.plots import plot_sweep

                path = self.figure_path(f"sweep-{method}-{file_data}-{arch}-{keys[0]}.png")
                lines = [(lab, ms, ss) for lab, (ms, ss) in plot_lines.items()]
                plot_sweep(keys[0], xs, lines, path, title=f"{method} on {dataset}: {keys[0]}")
                self.add_figure(
                    path,
                    f"Accuracy of {' and '.join(r.upper() for r in roles)} against {keys[0]} "
                    f"({method}, {dataset}).",
                )

    def _label_for_path(self, p: str) -> str:
        try:
            rp = Path(p).resolve()
        except OSError:
            return Path(p).name
        for g in self.groups:
            for r in g.runs:
                if r.path.resolve() == rp or rp.is_relative_to(r.path.resolve()):
                    return g.short
        return Path(p).name

    def section_transfer(self) -> None:
        entries = [t for r in self.runs for t in run_eval(r).transfer]
        if not entries:
            return
        cells: dict[tuple[str, str], list[float]] = {}
        targets: list[str] = []
        surrogates: list[str] = []
        for t in entries:
            tgt, sur = self._label_for_path(t["target"]), self._label_for_path(t["surrogate"])
            cells.setdefault((tgt, sur), []).append(t["rate"])
            if tgt not in targets:
                targets.append(tgt)
            if sur not in surrogates:
                surrogates.append(sur)
        rows = [[t] + [fmt_ms(cells.get((t, s), [])) for s in surrogates] for t in targets]
        self.blocks.append(Heading("Black-box transfer (Table 3 layout)"))
        self.add_table(
            Table(
                ["Def \\ Sur", *surrogates],
                rows,
                caption="Success rate (%) of PGD adversarial examples made on the surrogate "
                "(column) against the defence (row); lower = more robust.",
                commands=self.eval_commands([r for r in self.runs if run_eval(r).transfer]),
                name="table3_transfer",
            )
        )

    def section_eps_sweep(self) -> None:
        data: dict[tuple[str, str], dict[float, list[float]]] = {}
        epss: set[float] = set()
        for g in self.groups:
            for r in g.runs:
                for e in run_eval(r).eps_sweep:
                    eps = round(e["eps"], 6)
                    epss.add(eps)
                    data.setdefault((g.short, e["role"]), {}).setdefault(eps, []).append(e["acc"])
        if not data:
            return
        cols = sorted(epss)
        headers = ["Defense"] + [_eps_label(e) for e in cols]
        rows = []
        for (label, role), by_eps in data.items():
            name = label if role == "g" else f"{label} (F)"
            rows.append([name] + [fmt_ms(by_eps.get(e, [])) for e in cols])
        self.blocks.append(Heading("Accuracy against epsilon (Table 5 layout)"))
        self.add_table(
            Table(
                headers,
                rows,
                caption="Robust accuracy (%) at each perturbation budget; it should fall "
                "monotonically and reach 0 (section 4.5).",
                commands=self.eval_commands([r for r in self.runs if run_eval(r).eps_sweep]),
                name="table5_eps",
            )
        )

    def section_sanity(self) -> None:
        rows = []
        for g in self.groups:
            for r in g.runs:
                for c in run_eval(r).sanity:
                    verdict = {True: "pass", False: "FAIL"}.get(c["passed"], str(c["passed"]))
                    who = f"{g.short} (seed {r.seed}, {r.name})"
                    rows.append([who, c["role"].upper(), c["name"], verdict, c["detail"]])
        if not rows:
            return
        self.blocks.append(Heading("Gradient-masking sanity checks"))
        self.add_table(
            Table(
                ["Run", "Model", "Check", "Result", "Detail"],
                rows,
                commands=self.eval_commands([r for r in self.runs if run_eval(r).sanity]),
                name="sanity",
            )
        )

    def section_analyses(self) -> None:
        from actrain.analysis.plots import plot_bars, plot_norms, plot_probe

        analysed = [g for g in self.groups if any(r.analysis for r in g.runs)]
        if not analysed:
            self.blocks.append(Heading("Analyses"))
            self.blocks.append(
                Para(
                    "No analyses in these runs: `actrain analyze RUN...` (or `actrain report "
                    "--analyze`) adds model complexity, information compression and posterior "
                    "entropy (Figures 3 and 4)."
                )
            )
            return
        cmds: list[str] = []
        for g in analysed:
            for r in g.runs:
                analysis = r.analysis or {}
                models = analysis.get("models")
                each = (
                    [m.get("command") for m in models.values() if isinstance(m, dict)]
                    if isinstance(models, dict)
                    else []
                )
                for c in [analysis.get("command"), *each]:
                    if isinstance(c, str) and c not in cmds:
                        cmds.append(c)

        def series(g: Group, role: str) -> str:
            return g.short if role == "g" and len(g.roles) == 1 else f"{g.short} ({role.upper()})"

        # Fig. 3 left: norms, one plot per (data set, arch); an ImageFolder folder is a data set
        self.blocks.append(Heading("Model complexity (Fig. 3 left)"))
        stale = [r for g in analysed for r in g.runs if r.analysis_stale]
        if stale:
            self.blocks.append(
                Para(
                    "**Out of date:** "
                    + "; ".join(
                        f"{r.path} was analysed at epoch {r.analysis['epoch']} and has trained"
                        f" to epoch {r.epochs_done} since"
                        for r in stale
                    )
                    + " (`actrain analyze` them again, or `actrain report --analyze`)."
                )
            )
        by_fam: dict[tuple[str, str], list[Group]] = {}
        for g in analysed:
            by_fam.setdefault((g.data, g.arch), []).append(g)
        for (dataset, arch), gs in by_fam.items():
            file_data = gs[0].data_slug
            lines = []
            layers: list[str] = []
            table_cols: list[tuple[str, list[list[float]]]] = []
            for g in gs:
                for role in g.roles:
                    reps = [
                        [row["norm"] for row in r.analysis["models"][role]["norms"]]
                        for r in g.runs
                        if r.analysis and role in r.analysis.get("models", {})
                    ]
                    if not reps:
                        continue
                    if not layers:
                        a = next(r.analysis for r in g.runs if r.analysis)
                        layers = [row["layer"] for row in a["models"][role]["norms"]]
                    lines.append((series(g, role), reps))
                    table_cols.append((series(g, role), reps))
            path = self.figure_path(f"norms-{file_data}-{arch}.png")
            plot_norms(lines, layers, path, title=f"Frobenius norms per layer: {arch} on {dataset}")
            self.add_figure(
                path, f"Frobenius norm of each learnable layer's weights, {arch} on {dataset}."
            )
            rows = []
            for i, layer in enumerate(layers):
                rows.append(
                    [str(i + 1), layer]
                    + [
                        fmt_ms([rep[i] for rep in reps if i < len(rep)], 3)
                        for _, reps in table_cols
                    ]
                )
            rows.append(
                ["", "sum"] + [fmt_ms([sum(rep) for rep in reps], 3) for _, reps in table_cols]
            )
            self.add_table(
                Table(
                    ["#", "Layer", *[n for n, _ in table_cols]],
                    rows,
                    caption=f"Frobenius norms ({arch}, {dataset}).",
                    commands=cmds,
                    name=f"norms_{file_data}_{arch}",
                )
            )

        # Fig. 3 right: random-label probe, one plot per data set
        self.blocks.append(Heading("Information compression (Fig. 3 right)"))
        by_ds: dict[str, list[Group]] = {}
        for g in analysed:
            by_ds.setdefault(g.data, []).append(g)
        for dataset, gs in by_ds.items():
            file_data = gs[0].data_slug
            lines, rows = [], []
            chance = None
            by_setting: dict[str, list[str]] = {}  # probe settings -> the series probed so
            for g in gs:
                for role in g.roles:
                    probes = [
                        r.analysis["models"][role]["probe"]
                        for r in g.runs
                        if r.analysis and role in r.analysis.get("models", {})
                    ]
                    if not probes:
                        continue
                    chance = probes[0]["chance_acc"]
                    for p in probes:
                        names = by_setting.setdefault(_probe_setting(p), [])
                        if series(g, role) not in names:
                            names.append(series(g, role))
                    lines.append((series(g, role), [p["curve"] for p in probes]))
                    rows.append(
                        [
                            series(g, role),
                            fmt_ms([p["final_acc"] for p in probes]),
                            fmt_ms([p["best_acc"] for p in probes]),
                            f"{probes[0]['chance_acc']:.2f}",
                            str(probes[0]["n"]),
                            str(len(probes)),
                        ]
                    )
            path = self.figure_path(f"compression-{file_data}.png")
            plot_probe(lines, path, chance=chance, title=f"Random-label probe on {dataset}")
            self.add_figure(
                path,
                f"Accuracy of a 400-200 MLP on frozen penultimate features fitting fixed random "
                f"binary labels of the {dataset} training images (lower = more compression).",
            )
            desc, flag = _settings_flag(
                by_setting, f"probe settings on {dataset}", "probed", "accuracies"
            )
            if flag is not None:
                self.blocks.append(flag)
            self.add_table(
                Table(
                    ["Model", "Final acc.", "Best acc.", "Chance", "Images", "Seeds"],
                    rows,
                    caption=f"Random-label fitting accuracy (%) on {dataset}.{desc}",
                    commands=cmds,
                    name=f"compression_{file_data}",
                )
            )

        # Fig. 4: entropy bars per data set (an ImageFolder run's folder is its data set)
        self.blocks.append(Heading("Posterior entropy (Fig. 4)"))
        bars: dict[str, list[tuple[str, float, float]]] = {}
        refs: dict[str, float] = {}
        rows = []
        settings: dict[str, dict[str, list[str]]] = {}  # data set -> settings -> series so made
        for g in analysed:
            data = g.data
            classes = next((c for c in map(_run_num_classes, g.runs) if c), None)
            if classes:
                refs[data] = math.log(classes)
            for role in g.roles:
                made = [
                    (r.analysis["models"][role], r.analysis)
                    for r in g.runs
                    if r.analysis and role in r.analysis.get("models", {})
                ]
                if not made:
                    continue
                vals = [model["entropy"] for model, _ in made]
                counts = sorted(
                    {_analysis_samples(model, a) for model, a in made}, key=lambda n: n or 0
                )
                for n in counts:
                    names = settings.setdefault(data, {}).setdefault(_entropy_setting(n), [])
                    if series(g, role) not in names:
                        names.append(series(g, role))
                m, s = mean_std(vals)
                bars.setdefault(data, []).append((series(g, role), m, s))
                rows.append(
                    [
                        data,
                        f"{series(g, role)} · {g.arch}",
                        fmt_ms(vals, 4),
                        ", ".join("?" if n is None else str(n) for n in counts),
                        f"{math.log(classes):.4f}" if classes else "–",
                        str(len(vals)),
                    ]
                )
        path = self.figure_path("entropy.png")
        plot_bars(
            bars, path, "mean softmax entropy (nats)", "Average posterior entropy (Fig. 4)", refs
        )
        self.add_figure(path, "Average entropy of the softmax over the training images.")
        descs = []
        for data, by_setting in settings.items():  # the compression table's flag, per data set
            desc, flag = _settings_flag(
                by_setting, f"analysis settings for the entropy on {data}", "analysed", "entropies"
            )
            descs.append(f" {data}:{desc}" if len(settings) > 1 else desc)
            if flag is not None:
                self.blocks.append(flag)
        self.add_table(
            Table(
                ["Dataset", "Model", "Mean entropy (nats)", "Images", "log C", "Seeds"],
                rows,
                caption="Mean posterior entropy over the training set; log(C) is the maximum."
                + "".join(descs),
                commands=cmds,
                name="entropy",
            )
        )

    def section_curves(self) -> None:
        from actrain.analysis.plots import plot_training_curves

        self.blocks.append(Heading("Training curves"))
        for g in self.groups:
            if not any(r.metrics for r in g.runs):
                continue
            roles = g.roles
            panels = []
            loss_lines = []
            clean_lines = []
            rob_lines = []
            for role in roles:
                R = role.upper()
                for key, label, target in (
                    (f"loss_{role}", f"{R} loss", loss_lines),
                    (f"train_acc_{role}", f"{R} train", clean_lines),
                ):
                    reps, epochs = _series(g.runs, key)
                    if reps:
                        target.append((label, reps, epochs))
                for prefix in ("test", "val"):
                    reps, epochs = _series(g.runs, f"{prefix}_clean_acc_{role}")
                    if reps:
                        clean_lines.append((f"{R} {prefix} clean", reps, epochs))
                    keys = sorted(
                        {
                            k
                            for r in g.runs
                            for rec in r.metrics
                            for k in rec
                            if re.fullmatch(rf"{prefix}_pgd\d+_acc_{role}", k)
                        }
                    )
                    for k in keys:
                        reps, epochs = _series(g.runs, k)
                        steps = re.findall(r"pgd(\d+)", k)[0]
                        rob_lines.append((f"{R} {prefix} PGD-{steps}", reps, epochs))
            panels = [("training loss", loss_lines), ("clean accuracy (%)", clean_lines)]
            if rob_lines:
                panels.append(("robust accuracy (%)", rob_lines))
            path = self.figure_path(f"curves-{self.slug(g)}.png")
            seeds = ", ".join(str(s) for s in g.seeds)
            plot_training_curves(panels, path, title=f"{g.label} (seeds {seeds})")
            self.add_figure(
                path,
                f"Training curves of {g.label}: mean over seeds {seeds} (band: ± std). "
                "Train accuracy is measured on the training batches as each model trains on them "
                "(adversarial for G, clean for F and natural training).",
            )


def _run_num_classes(run: Run) -> int | None:
    """The classes ``run`` was trained on: recorded by its analysis, else in its weights' model
    spec, else the data set's fixed count (an ImageFolder set has none: its folder decides)."""
    n = (run.analysis or {}).get("num_classes")
    if isinstance(n, int) and n > 0:
        return n
    try:
        from actrain.checkpoint import read_weights_metadata

        spec = read_weights_metadata(run.path / "model_g.safetensors").get("spec", {})
        if isinstance(spec.get("num_classes"), int):
            return int(spec["num_classes"])
    except Exception:  # noqa: BLE001 - no or unreadable weights: try the data set's count
        pass
    try:
        from actrain.data import get_dataset_info

        n = getattr(get_dataset_info(run.dataset), "num_classes", None)
        return int(n) if n else None
    except Exception:  # noqa: BLE001 - a reference line is optional
        return None


def _data_keys(groups: Sequence[Group]) -> dict[int, str]:
    """A name per data set for each group (by ``id``): the data set's, and for an ImageFolder
    run the folder's too (``imagefolder (birds)``, its full path where two folders share the
    name), since two folders are two data sets with their own classes."""
    dirs = {
        id(g): str(g.first.config.get("data_dir")) for g in groups if g.dataset == "imagefolder"
    }
    names: dict[str, set[str]] = {}
    for d in set(dirs.values()):
        names.setdefault(Path(d).name, set()).add(d)
    keys = {}
    for g in groups:
        if id(g) in dirs:
            d = dirs[id(g)]
            keys[id(g)] = f"{g.dataset} ({Path(d).name if len(names[Path(d).name]) == 1 else d})"
        else:
            keys[id(g)] = g.dataset
    return keys


def _data_slugs(keys: Iterable[str]) -> dict[str, str]:
    """A file-name part per data set name (:func:`_data_keys`): the name itself where it is
    one (``digits``: file names as ever), else its characters other than letters, digits and
    ``._=-`` turned into dashes (``imagefolder-birds``), with a hash of the name added where
    two would come out alike or it is long (``/a/b-c/x`` and ``/a/b/c/x`` both give ``a-b-c-x``):
    two data sets must never share, or overwrite each other's, figure file."""
    names = sorted(set(keys))
    plain = {k: re.sub(r"[^A-Za-z0-9._=-]+", "-", k).strip("-") or "data" for k in names}
    count: dict[str, int] = {}
    for s in plain.values():
        count[s] = count.get(s, 0) + 1
    out = {}
    for k, s in plain.items():
        if s != k and (count[s] > 1 or len(s) > 40):
            s = f"{s[:31].rstrip('-')}-{hashlib.sha1(k.encode()).hexdigest()[:8]}"
        out[k] = s
    return out


def _analysis_samples(model: dict[str, Any], analysis: dict[str, Any]) -> int | None:
    """Training images behind one model's analysis (its own count, else the analysis's)."""
    n = model.get("samples", analysis.get("samples"))
    if n is None and isinstance(model.get("probe"), dict):
        n = model["probe"].get("n")
    return int(n) if isinstance(n, (int, float)) else None


def _entropy_setting(samples: int | None) -> str:
    """What makes two entropies comparable, as the caption states it: the images averaged."""
    return (
        "unrecorded number of training images" if samples is None else f"{samples} training images"
    )


def _settings_flag(
    by_setting: dict[str, list[str]], what: str, verb: str, quantity: str
) -> tuple[str, Para | None]:
    """The caption's text of a table's analysis settings (``by_setting``: setting -> the series
    made so) and, where the rows were not made alike, the paragraph that says so: their numbers
    do not compare (one setting alone in the caption passed it for every row's)."""
    if not by_setting:
        return "", None
    if len(by_setting) == 1:
        return f" {next(iter(by_setting))}.", None
    desc = " " + "; ".join(f"{k} ({', '.join(v)})" for k, v in by_setting.items())
    flag = Para(
        f"**Different {what}:** the rows below were not {verb} alike (settings with each row in"
        f" the caption), so their {quantity} do not compare; `actrain analyze` them with one"
        " setting."
    )
    return desc, flag


def _series(runs: list[Run], key: str) -> tuple[list[list[float]], list[int]]:
    reps: list[list[float]] = []
    epochs: list[int] = []
    for r in runs:
        recs = [rec for rec in r.metrics if key in rec]
        if recs:
            reps.append([float(rec[key]) for rec in recs])
            if len(recs) > len(epochs):
                epochs = [int(rec["epoch"]) for rec in recs]
    return reps, epochs


def _eps_label(eps: float) -> str:
    k = eps * 255
    if abs(k - round(k)) < 1e-3:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


#: The names of the figures a report writes (:class:`ReportBuilder`), ``.N`` before ``.png``
#: where a file it did not write had the name (:func:`figure_name`); no other file is removed.
OWN_FIGURE = re.compile(
    r"(?:(?:norms|compression|curves|sweep|examples)-[^/\\]+|entropy(?:\.\d+)?)\.png"
)
#: The reports a folder may hold (``actrain report`` and ``actrain analyze --out``), each with
#: its ``STEM.json`` listing the figures it wrote.
STEMS = ("report", "analysis")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(path: Path) -> dict[str, Any]:
    """A report's ``STEM.json`` as written last time; ``{}`` if none or not one."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _is_report_manifest(doc: dict[str, Any]) -> bool:
    """Whether ``STEM.json`` is one a report wrote (and so its ``STEM.md``/``.html`` too)."""
    return isinstance(doc.get("runs"), list) and isinstance(doc.get("tables"), dict)


def check_report_folder(out: str | Path, stem: str, flag: str = "--out") -> None:
    """Refuse a folder whose ``STEM.md``/``.html``/``.json`` no earlier report wrote: the report
    replaces its own files there, never a person's (a notes file named report.md, say)."""
    out = Path(out)
    if _is_report_manifest(_manifest(out / f"{stem}.json")):
        return
    for suffix in ("md", "html", "json"):
        path = out / f"{stem}.{suffix}"
        if path.exists() or path.is_symlink():
            raise UsageError(
                f"{flag}: {path} exists and no earlier report wrote it (no {stem}.json of"
                " one beside it); give another folder or move that file"
            )


def figure_name(out: Path, name: str, previous: dict[str, Any], taken: set[str]) -> str:
    """``name``, or ``name`` with ``.2``, ``.3``... before ``.png`` where a file the last report
    did not write (or one written then changed since) has it: a report draws over its own
    figures only, never over a person's picture that happens to share the name."""
    hashes = previous.get("figure_sha256")
    hashes = hashes if isinstance(hashes, dict) else {}
    stem = name[: -len(".png")]
    for k in range(1, 1000):
        cand = name if k == 1 else f"{stem}.{k}.png"
        path = out / cand
        if cand in taken:
            continue
        if not (path.exists() or path.is_symlink()):
            return cand
        if path.is_file() and not path.is_symlink() and hashes.get(cand) == _sha256(path):
            return cand
    raise UsageError(f"--out: {out} holds 999 files named like {name}; give another folder")


def remove_stale_figures(
    out: Path, stem: str, previous: dict[str, Any], now: list[str]
) -> list[str]:
    """Remove the figures the last report of ``stem`` in ``out`` wrote that this one does not
    (a report redone with fewer runs left the plots of the others beside it). A file goes only
    if the last report listed it with its SHA-256 and it is still that file, it has a report
    figure's name, and the folder's other report does not list it: a file a person made or
    changed is never removed (an older report's list without hashes removes nothing)."""
    hashes = previous.get("figure_sha256")
    if not isinstance(hashes, dict):
        return []
    others = {
        str(f)
        for other in STEMS
        if other != stem
        for f in _manifest(out / f"{other}.json").get("figures", []) or []
    }
    removed = []
    for name, digest in hashes.items():
        path = out / str(name)
        if (
            name in now
            or name in others
            or not isinstance(name, str)
            or not OWN_FIGURE.fullmatch(name)
            or not path.is_file()
            or path.is_symlink()
        ):
            continue
        if _sha256(path) == digest:
            path.unlink()
            removed.append(name)
    return removed


def build_report(
    runs: list[Run],
    out_dir: str | Path,
    *,
    title: str = "actrain report",
    command: str | None = None,
    sections: Sequence[str] = SECTIONS,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` (self-contained), ``report.json`` and the PNGs;
    remove the PNGs the last report into ``out_dir`` wrote and this one does not."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _EVAL_CACHE.clear()
    stem = "report" if "runs" in sections else "analysis"
    check_report_folder(out, stem)
    previous = _manifest(out / f"{stem}.json")  # before this report overwrites it
    builder = ReportBuilder(runs, out, title, command, sections, previous)
    blocks = builder.build()
    md = out / f"{stem}.md"
    md.write_text(render_markdown(blocks))
    page = out / f"{stem}.html"
    page.write_text(render_html(blocks, out, title))
    js = out / f"{stem}.json"
    js.write_text(
        json.dumps(
            {
                "title": title,
                "command": command,
                "runs": [str(r.path) for r in runs],
                "groups": [
                    {"label": g.label, "runs": [str(r.path) for r in g.runs], "seeds": g.seeds}
                    for g in builder.groups
                ],
                "tables": builder.tables,
                "figures": [p.name for p in builder.figures],
                # what this report wrote: the next one into this folder removes what it no
                # longer draws, if unchanged (remove_stale_figures)
                "figure_sha256": {p.name: _sha256(p) for p in builder.figures},
            },
            indent=2,
        )
    )
    now = [p.name for p in builder.figures]
    removed = remove_stale_figures(out, stem, previous, now)
    return {
        "markdown": md,
        "html": page,
        "json": js,
        "figures": builder.figures,
        "removed": removed,
    }


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["actrain", *argv])
