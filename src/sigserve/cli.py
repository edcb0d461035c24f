"""The ``sigserve`` command line.

Every refusal prints one line, ``error_code: message``, on stderr and exits non-zero (2 for
``validation_error``, 1 otherwise). ``--json`` prints machine-readable output where it applies.

    sigserve models register model.txt --name trend
    sigserve models promote trend:1 --to production
    sigserve features import features.parquet --interval 1h
    sigserve signals create --id trend-1h --model trend@production --interval 1h
    sigserve backfill --signal trend-1h --symbol BTCUSDT --interval 1h --mode window \\
        --start 2024-01-01 --end 2024-06-30
    sigserve predict --signal trend-1h --symbol BTCUSDT --interval 1h --ts 2024-06-30T12:00Z
    sigserve serve --port 8000                    # HTTP on 127.0.0.1; bearer SIGSERVE_AUTH_TOKEN
    sigserve demo --no-serve
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError as SettingsError
from typer.exceptions import Abort, Exit, TyperException

from .config import Settings
from .domain import Policy, SignalDefinition, Source, Stage
from .errors import SigserveError, ValidationError
from .timeutil import check_window, format_ts, parse_ts, validate_interval

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Turn trained trading models into live, auditable trading signals.")
models_app = typer.Typer(no_args_is_help=True, help="Register models and move them through the lifecycle.")
features_app = typer.Typer(no_args_is_help=True,
                           help="Compute (from a spec), import, list, deprecate and check features.")
candles_app = typer.Typer(no_args_is_help=True, help="Import OHLCV candles.")
signals_app = typer.Typer(no_args_is_help=True, help="Define, list and retire signals.")
app.add_typer(models_app, name="models")
app.add_typer(features_app, name="features")
app.add_typer(candles_app, name="candles")
app.add_typer(signals_app, name="signals")
db_app = typer.Typer(no_args_is_help=True, help="Create or upgrade the store's schema.")
app.add_typer(db_app, name="db")
from .routing.cli import models_ensemble, rollout_app  # noqa: E402  (champion / challenger / shadow)

app.add_typer(rollout_app, name="rollout")
models_app.command("ensemble")(models_ensemble)

def _console(**options: Any) -> Any:
    from rich.console import Console

    return Console(**options)


class _LazyConsole:
    """A rich Console made on first use: importing rich costs ~40 ms of every command's start,
    ``sigserve serve``'s cold start included, which prints nothing through it."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._real: Any = None

    def get(self) -> Any:
        """The Console itself (for an API that wants one, such as rich's Progress)."""
        if self._real is None:
            self._real = _console(**self._options)
        return self._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


def _table(*headers: str) -> Any:
    from rich.table import Table

    return Table(*headers)


console = _LazyConsole()
_state: dict[str, Any] = {}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.callback()
def _root(
    home: Annotated[Path | None, typer.Option(envvar="SIGSERVE_HOME", help="Data directory.")] = None,
    store: Annotated[str | None, typer.Option(envvar="SIGSERVE_STORE", help="Store URL.")] = None,
) -> None:
    overrides: dict[str, Any] = {}
    if home is not None:
        overrides["home"] = home
    if store is not None:
        overrides["store"] = store
    _state["settings"] = Settings(**overrides)


def _settings() -> Settings:
    settings = _state.get("settings")
    return settings if isinstance(settings, Settings) else Settings()


def _run(work: Callable[[Any], Awaitable[T]]) -> T:
    from .app import Services

    async def main() -> T:
        async with Services.open(_settings()) as services:
            return await work(services)

    return asyncio.run(main())


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or []:
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


def _model_ref(text: str) -> tuple[str, int]:
    from .registry.models import parse_model_ref

    name, ref = parse_model_ref(text)
    if ref.startswith("@"):
        raise ValidationError(f"{text!r}: this command needs NAME:VERSION")
    return name, int(ref)


# --- models ---------------------------------------------------------------------------------
@models_app.command("register")
def models_register(
    file: Annotated[Path, typer.Argument(help="Model file: LightGBM .txt, XGBoost .json/.ubj, ONNX, skops, pickle.")],
    name: Annotated[str, typer.Option(help="Model name.")],
    features: Annotated[list[str] | None, typer.Option(help="Feature names in model order (a,b,c).")] = None,
    classes: Annotated[list[str] | None, typer.Option(help="Class labels in model order.")] = None,
    task: Annotated[str | None, typer.Option(help="binary | multiclass | regression.")] = None,
    metric: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow a pickle (it runs code when loaded).")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="Compile a LightGBM model with lleaves.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Store a model file content-addressed, read its card, and give it the next version."""
    metrics: dict[str, Any] = {}
    for item in _split(metric):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValidationError(f"--metric {item!r}: use KEY=VALUE")
        try:
            metrics[key] = float(value)
        except ValueError:
            metrics[key] = value

    async def work(s: Any) -> Any:
        card = await s.registry.register(
            file, name=name, features=_split(features) or None, classes=_split(classes) or None,
            task=task, metrics=metrics, trust_pickle=trust_pickle)
        if compile_model:
            card = await s.registry.compile(card.name, card.version)
        return card

    card = _run(work)
    if as_json:
        _print_json(card.to_dict())
        return
    console.print(f"registered [bold]{card.ref}[/] ({card.flavor}, {card.task}, "
                  f"{len(card.feature_names)} features) sha256 {card.sha256}")


@models_app.command("list")
def models_list(name: Annotated[str | None, typer.Option()] = None, as_json: JsonOpt = False) -> None:
    """List model versions with their stage."""
    cards = _run(lambda s: s.store.list_models(name))
    if as_json:
        _print_json([c.to_dict() for c in cards])
        return
    table = _table("model", "version", "stage", "flavor", "task", "features", "runtime", "sha256")
    for c in cards:
        table.add_row(c.name, str(c.version), str(c.stage), c.flavor, str(c.task),
                      str(len(c.feature_names)), c.runtime or c.flavor, (c.sha256 or "")[:12])
    console.print(table)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME@alias.")],
                as_json: JsonOpt = False) -> None:
    """Show a model card and its lifecycle events."""
    from .registry.models import parse_model_ref

    name, model_ref = parse_model_ref(ref)

    async def work(s: Any) -> dict[str, Any]:
        card = await s.registry.resolve(name, model_ref)
        data = card.to_dict()
        data["events"] = [e for e in await s.store.model_events(name) if e["version"] == card.version]
        return data

    data = _run(work)
    if as_json:
        _print_json(data)
        return
    for key, value in data.items():
        console.print(f"[bold]{key}[/]: {value}")


def _lifecycle(ref: str, action: str, to: Stage | None = None) -> None:
    name, version = _model_ref(ref)

    async def work(s: Any) -> Any:
        if action == "promote":
            assert to is not None
            return await s.registry.promote(name, version, to)
        return await getattr(s.registry, action)(name, version)

    card = _run(work)
    console.print(f"{card.ref} is now [bold]{card.stage}[/]")


@models_app.command("promote")
def models_promote(ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
                   to: Annotated[str, typer.Option("--to", help="staging | production")]) -> None:
    """Promote a version to staging or production (the previous holder is demoted)."""
    if to not in ("staging", "production"):
        raise ValidationError(f"--to {to!r}: use staging or production")
    _lifecycle(ref, "promote", Stage(to))


@models_app.command("retire")
def models_retire(ref: Annotated[str, typer.Argument(help="NAME:VERSION")]) -> None:
    """Retire a version: it is never served again."""
    _lifecycle(ref, "retire")


@models_app.command("reject")
def models_reject(ref: Annotated[str, typer.Argument(help="NAME:VERSION")]) -> None:
    """Reject a version (rejected_by_operator): it is never served."""
    _lifecycle(ref, "reject")


@models_app.command("compile")
def models_compile(ref: Annotated[str, typer.Argument(help="NAME:VERSION")]) -> None:
    """Compile a LightGBM version with lleaves (20-60 s once; cached by sha256)."""
    name, version = _model_ref(ref)
    with console.status(f"compiling {ref} with lleaves"):
        card = _run(lambda s: s.registry.compile(name, version))
    console.print(f"{card.ref} now runs on [bold]{card.runtime}[/]")


# --- features and candles -------------------------------------------------------------------
@features_app.command("import")
def features_import(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet: symbol, ts, one column per feature.")],
    interval: Annotated[str, typer.Option(help="Bar interval, e.g. 1h.")],
    feature_key: Annotated[str | None, typer.Option(help="Name of this feature computation.")] = None,
    symbol: Annotated[str | None, typer.Option(help="Symbol, when the file has no symbol column.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import feature rows (upsert; the whole file or nothing). New names get registered."""
    from .features.io import file_digest, read_feature_file

    validate_interval(interval)
    table = read_feature_file(file, symbol)
    key = feature_key or f"file-{file_digest(file)[:16]}"

    async def work(s: Any) -> tuple[int, list[str]]:
        new = await s.store.register_features(list(table.names))
        rows = await s.store.write_features(interval, key, table.names, table.symbols, table.ts,
                                            table.values)
        return rows, new

    rows, new = _run(work)
    result = {"rows": rows, "feature_key": key, "features": list(table.names),
              "newly_registered": new, "symbols": sorted(set(table.symbols.tolist()))}
    if as_json:
        _print_json(result)
        return
    console.print(f"imported {rows} feature rows ({len(table.names)} features) as feature_key "
                  f"[bold]{key}[/]; newly registered: {', '.join(new) or 'none'}")


@features_app.command("compute")
def features_compute(
    spec_file: Annotated[Path, typer.Option("--spec", help="Pipeline YAML (its features: section).")],
    symbol: Annotated[list[str], typer.Option(help="Symbol (repeatable, or a,b,c).")],
    interval: Annotated[str, typer.Option(help="Bar interval, e.g. 1h.")],
    start: Annotated[str | None, typer.Option(help="First bar to write (default: all history).")] = None,
    end: Annotated[str | None, typer.Option(help="Last bar to write.")] = None,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows per transaction.")] = 250_000,
    as_json: JsonOpt = False,
) -> None:
    """Compute a feature spec over the stored candles and upsert the rows under the spec's
    feature_key (spec-<hash>); warm-up rows are dropped and counted. Reruns are idempotent."""
    from .features.pipeline import compute_and_store
    from .features.spec import FeatureSpec

    validate_interval(interval)
    a = parse_ts(start, field="start") if start else None
    b = parse_ts(end, field="end") if end else None
    if a is not None and b is not None:
        check_window(a, b)
    spec = FeatureSpec.from_yaml(spec_file)
    settings = _settings()

    async def work(s: Any) -> list[dict[str, Any]]:
        return [await compute_and_store(s.store, spec, sym, interval, start=a, end=b,
                                        chunk_rows=chunk_rows, home=settings.home)
                for sym in _split(symbol)]

    reports = _run(work)
    if as_json:
        _print_json(reports[0] if len(reports) == 1 else reports)
        return
    for r in reports:
        console.print(f"{r['symbol']} {r['interval']}: wrote {r['rows_written']} feature rows"
                      f" ({len(r['features'])} features) as feature_key [bold]{r['feature_key']}[/];"
                      f" {r['warmup_rows_dropped']} warm-up rows dropped")


@features_app.command("list")
def features_list(as_json: JsonOpt = False) -> None:
    """List registered and deprecated features."""
    rows = _run(lambda s: s.store.list_features())
    if as_json:
        _print_json(rows)
        return
    table = _table("name", "status", "created_at")
    for r in rows:
        table.add_row(r["name"], r["status"], r["created_at"])
    console.print(table)


@features_app.command("deprecate")
def features_deprecate(name: str) -> None:
    """Deprecate a feature: models that need it are refused (feature_not_registered)."""
    _run(lambda s: s.store.set_feature_status(name, "deprecated"))
    console.print(f"feature {name} is deprecated")


@features_app.command("restore")
def features_restore(name: str) -> None:
    """Return a deprecated feature to registered."""
    _run(lambda s: s.store.set_feature_status(name, "registered"))
    console.print(f"feature {name} is registered")


@features_app.command("check")
def features_check(
    interval: Annotated[str, typer.Option()],
    symbol: Annotated[str | None, typer.Option()] = None,
    start: Annotated[str | None, typer.Option()] = None,
    end: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option(help="How many missing bars to list.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Report bars that have candles but no features."""
    validate_interval(interval)
    a = parse_ts(start, field="start") if start else None
    b = parse_ts(end, field="end") if end else None
    count, rows = _run(lambda s: s.store.bars_missing_features(interval, symbol, a, b, limit))
    result = {"bars_missing_features": count,
              "first": [{"symbol": sym, "ts": format_ts(ts)} for sym, ts in rows]}
    if as_json:
        _print_json(result)
        return
    if count == 0:
        console.print("every candle bar has features")
        return
    console.print(f"[bold]{count}[/] bars have candles but no features; first {len(rows)}:")
    for sym, ts in rows:
        console.print(f"  {sym} {format_ts(ts)}")


@candles_app.command("import")
def candles_import(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet: ts, open, high, low, close, volume.")],
    symbol: Annotated[str, typer.Option()],
    interval: Annotated[str, typer.Option()],
) -> None:
    """Import OHLCV candles (upsert; the whole file or nothing)."""
    from .features.io import read_candle_file

    validate_interval(interval)
    candles = read_candle_file(file, symbol)
    rows = _run(lambda s: s.store.write_candles(symbol, interval, candles))
    console.print(f"imported {rows} candles for {symbol} {interval}")


# --- signals --------------------------------------------------------------------------------
@signals_app.command("create")
def signals_create(
    signal_id: Annotated[str, typer.Option("--id", help="Signal id.")],
    model: Annotated[str, typer.Option(help="NAME, NAME@alias or NAME:VERSION.")],
    interval: Annotated[str, typer.Option()],
    symbols: Annotated[list[str] | None, typer.Option(help="Symbols (a,b); none: any symbol.")] = None,
    threshold: Annotated[float, typer.Option(help="p(up), min class prob, or return.")] = 0.55,
    class_action: Annotated[list[str] | None, typer.Option(help="CLASS=buy|sell|hold, repeatable.")] = None,
    atr_feature: Annotated[str | None, typer.Option(help="ATR feature for levels (default: first atr*).")] = None,
    atr_sl: Annotated[float, typer.Option(help="Stop-loss distance in ATRs.")] = 1.5,
    atr_tp: Annotated[float, typer.Option(help="Take-profit distance in ATRs.")] = 3.0,
    risk_fraction: Annotated[float, typer.Option(help="Equity fraction risked per trade.")] = 0.01,
    equity: Annotated[float, typer.Option(help="Account equity for sizing.")] = 100_000.0,
    max_leverage: Annotated[float, typer.Option(help="Cap on notional / equity.")] = 1.0,
    position_aware: Annotated[bool, typer.Option(help="Emit close_long/close_short.")] = True,
    feature_key: Annotated[str | None, typer.Option(help="Pin one feature computation.")] = None,
) -> None:
    """Define a signal: a model (by alias or pinned version), an interval, symbols and a policy."""
    from .registry.models import parse_model_ref

    validate_interval(interval)
    if not signal_id or len(signal_id) > 128:
        raise ValidationError("--id must be 1 to 128 characters")
    name, ref = parse_model_ref(model)
    actions: dict[str, str] = {}
    for item in _split(class_action):
        cls, sep, action = item.partition("=")
        if not sep:
            raise ValidationError(f"--class-action {item!r}: use CLASS=ACTION")
        actions[cls] = action
    policy = Policy(threshold=threshold, class_actions=actions, atr_feature=atr_feature,
                    atr_multiplier_sl=atr_sl, atr_multiplier_tp=atr_tp, risk_fraction=risk_fraction,
                    equity=equity, max_leverage=max_leverage, position_aware=position_aware)
    definition = SignalDefinition(signal_id, name, ref, interval, tuple(_split(symbols)), policy,
                                  feature_key=feature_key)

    async def work(s: Any) -> None:
        from .signals.policy import PolicyPlan

        card = await s.registry.resolve(name, ref)
        s.registry.check_servable(card)
        PolicyPlan.build(policy, card, card.feature_names)  # refuse a policy the model can't use
        await s.store.create_signal(definition)

    _run(work)
    console.print(f"signal [bold]{signal_id}[/] -> {name}{'' if ref.startswith('@') else ':'}{ref}"
                  f" on {interval}")


@signals_app.command("list")
def signals_list(as_json: JsonOpt = False) -> None:
    """List signal definitions."""
    defs = _run(lambda s: s.store.list_signals())
    if as_json:
        _print_json([_definition_dict(d) for d in defs])
        return
    table = _table("signal_id", "model", "interval", "symbols", "status", "threshold")
    for d in defs:
        ref = d.model_ref if d.model_ref.startswith("@") else ":" + d.model_ref
        table.add_row(d.signal_id, d.model_name + ref, d.interval, ",".join(d.symbols) or "*",
                      d.status, str(d.policy.threshold))
    console.print(table)


def _definition_dict(d: SignalDefinition) -> dict[str, Any]:
    return {"signal_id": d.signal_id, "model_name": d.model_name, "model_ref": d.model_ref,
            "interval": d.interval, "symbols": list(d.symbols), "status": d.status,
            "feature_key": d.feature_key, "policy": json.loads(d.policy.to_json()),
            "created_at": d.created_at}


@signals_app.command("retire")
def signals_retire(signal_id: str) -> None:
    """Retire a signal definition: it is refused from now on (signal_retired)."""
    _run(lambda s: s.store.set_signal_status(signal_id, "retired"))
    console.print(f"signal {signal_id} is retired")


@signals_app.command("history")
def signals_history(
    signal_id: str,
    symbol: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Show the newest stored signals of a definition."""
    async def work(s: Any) -> list[dict[str, Any]]:
        rows = await s.store.read_signals(signal_id, symbol)
        return rows[-limit:]

    rows = _run(work)
    if as_json:  # timestamps as everywhere else: ISO 8601 UTC (the store's are naive UTC)
        _print_json([{**r, "ts": format_ts(r["ts"]),
                      "created_at": r["created_at"].replace(tzinfo=UTC).isoformat()} for r in rows])
        return
    table = _table("ts", "symbol", "action", "confidence", "entry", "stop", "take", "size", "model")
    for r in rows:
        def fmt(x: Any) -> str:
            return "" if x is None else f"{x:.4g}"
        table.add_row(format_ts(r["ts"]), r["symbol"], r["action"], f"{r['confidence']:.3f}",
                      fmt(r["entry_price"]), fmt(r["stop_loss"]), fmt(r["take_profit"]),
                      fmt(r["recommended_size"]), f"{r['model_name']}:{r['model_version']}")
    console.print(table)


# --- database ---------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending schema migrations to the store (startup does the same)."""
    async def work(s: Any) -> tuple[str, int]:
        return s.store.url.split("@")[-1], await s.store.schema_version()

    where, version = _run(work)
    console.print(f"store {where} is at schema version [bold]{version}[/]")


# --- backfill and predict -------------------------------------------------------------------
@app.command("backfill")
def backfill_cmd(
    signal: Annotated[str, typer.Option(help="Signal id.")],
    interval: Annotated[str, typer.Option()],
    symbol: Annotated[list[str] | None, typer.Option(help="Symbol(s); default: the signal's.")] = None,
    mode: Annotated[str, typer.Option(help="window | last | ts-list")] = "window",
    start: Annotated[str | None, typer.Option()] = None,
    end: Annotated[str | None, typer.Option()] = None,
    ts: Annotated[list[str] | None, typer.Option(help="Bars for ts-list mode (repeat or comma-separate).")] = None,
    source: Annotated[str, typer.Option(help="historical_replay | catchup_scan | stream")] = "historical_replay",
    as_json: JsonOpt = False,
) -> None:
    """Predict signals for whole windows, in vectorised chunks; reruns are safe."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from .backfill import BackfillRequest, run_backfill

    validate_interval(interval)
    src = _source(source)
    a = parse_ts(start, field="start") if start else None
    b = parse_ts(end, field="end") if end else None
    ts_list = tuple(parse_ts(t) for t in _split(ts))
    if a is not None and b is not None:
        check_window(a, b)  # refuse a bad window before opening the store and loading the model

    async def work(s: Any) -> list[dict[str, Any]]:
        symbols = _split(symbol)
        if not symbols:
            definition = await s.engine.prepare(signal)
            symbols = list(definition.definition.symbols)
            if not symbols:
                raise ValidationError("this signal covers any symbol: pass --symbol")
        reports = []
        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeRemainingColumn(), console=_console(stderr=True),
                      disable=as_json or not sys.stderr.isatty()) as progress:
            for sym in symbols:
                task = progress.add_task(f"{signal} {sym}", total=None)

                def update(done: int, total: int, task: Any = task) -> None:
                    progress.update(task, completed=done, total=total)

                request = BackfillRequest(signal, sym, interval, mode, a, b, ts_list, src)
                report = await run_backfill(s.engine, request,
                                            max_rows=s.settings.max_backfill_rows,
                                            chunk_rows=s.settings.backfill_chunk_rows,
                                            progress=update)
                reports.append(report.to_dict())
        return reports

    reports = _run(work)
    if as_json:
        _print_json(reports)
        return
    for r in reports:
        console.print(
            f"{r['signal_id']} {r['symbol']} {r['interval']}: [bold]{r['rows_written']}[/] rows "
            f"written, {r['rows_skipped_missing_features']} skipped for missing features "
            f"({r['start']} .. {r['end']}, {r['elapsed_s']:.2f} s, {r['bars_per_s']:.0f} bars/s) "
            f"{r['actions']}")


def _source(value: str) -> str:
    try:
        return str(Source(value))
    except ValueError as exc:
        raise ValidationError(f"unknown source {value!r}: use {[s.value for s in Source]}") from exc


@app.command("predict")
def predict_cmd(
    signal: Annotated[str, typer.Option()],
    symbol: Annotated[str, typer.Option()],
    interval: Annotated[str, typer.Option()],
    ts: Annotated[str, typer.Option(help="Bar open time (UTC).")],
    source: Annotated[str, typer.Option()] = "historical_replay",
    dry_run: Annotated[bool, typer.Option(help="Do not store the signal.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Predict one bar through the full pipeline."""
    validate_interval(interval)
    when = parse_ts(ts)
    src = _source(source)
    row = _run(lambda s: s.engine.predict_bar(signal, symbol, interval, when, source=src,
                                              write=not dry_run))
    if as_json:
        _print_json(row)
        return
    for key, value in row.items():
        console.print(f"[bold]{key}[/]: {value}")


HostOpt = Annotated[str, typer.Option(envvar="SIGSERVE_HOST",
                                      help="Bind address (127.0.0.1: this machine only).")]
PortOpt = Annotated[int, typer.Option(envvar="SIGSERVE_PORT", min=1, max=65535, help="TCP port.")]


@app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Option("--config", help="Pipeline YAML (see examples/pipeline.yaml).")],
    stage: Annotated[str, typer.Option(help="Stop after this stage: features | labels | train.")] = "train",
    as_json: JsonOpt = False,
) -> None:
    """Raw OHLCV (+ annotations) -> spec features in the store -> labels -> split -> fit ->
    metrics, plots, MLflow -> registered model (and signal). One row of training_runs per run."""
    from .train.config import load_config
    from .train.run import STAGES, run_pipeline

    if stage not in STAGES:
        raise ValidationError(f"unknown stage {stage!r}: use one of {list(STAGES)}")
    pipeline = load_config(config)
    out = _console(stderr=True) if as_json else console.get()
    summary = _run(lambda s: run_pipeline(s, pipeline, stage=stage, console=out))
    if as_json:
        _print_json(summary)
        return
    _print_training(summary)


def _print_training(summary: dict[str, Any]) -> None:
    console.print(f"run [bold]{summary['run_id']}[/] ({summary['stage']}): {summary['status']};"
                  f" files in {summary['run_dir']}")
    features = summary.get("features") or {}
    if features:
        console.print(f"features: {features['rows_written']} rows as feature_key [bold]{features['feature_key']}[/]"
                      f" ({len(features['names'])} features, {features['warmup_rows_dropped']} warm-up rows dropped)")
    dataset = summary.get("dataset")
    if dataset:
        console.print(f"labels: {dataset['rows']} rows ({dataset['target']}), counts {dataset['stats']['counts']};"
                      f" dataset_version {dataset['version'][:16]}")
    metrics = summary.get("metrics")
    if metrics:
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("accuracy", "f1_macro", "f1_weighted", "auc", "rmse", "ic_spearman", "hit_rate",
                          "n_train", "n_valid", "n_test")}
        console.print(f"test metrics: {shown}")
    if summary.get("model"):
        console.print(f"registered [bold]{summary['model']}[/] ({summary.get('model_stage')})"
                      + (f", signal {summary['signal_id']}" if summary.get("signal_id") else ""))
    if summary.get("mlflow_run_id"):
        console.print(f"MLflow run {summary['mlflow_run_id']} at {summary.get('mlflow_uri')}")
    if summary.get("note"):
        console.print(f"[yellow]{summary['note']}[/]")


@app.command("serve")
def serve_cmd(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    store: Annotated[str | None, typer.Option(help="Store URL (overrides SIGSERVE_STORE).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (DuckDB: 1 only).")] = 1,
) -> None:
    """Serve the HTTP API (uvicorn). Every endpoint but /healthz and /readyz needs
    'Authorization: Bearer <SIGSERVE_AUTH_TOKEN>'; see /docs."""
    from .api.server import serve

    settings = _settings()
    if store is not None:
        settings = settings.model_copy(update={"store": store})
    serve(settings, host=host, port=port, workers=workers)


@app.command("demo")
def demo_cmd(
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Stop after the summary.")] = False,
    bars: Annotated[int, typer.Option(help="Bars per symbol (2 years of 1h by default).")] = 17_520,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
) -> None:
    """Synthetic market -> `sigserve train` on a written pipeline.yaml (TA-Lib features, labels,
    LightGBM, MLflow) -> registered model and signal -> backfill -> summary, then serve the HTTP
    API on it (unless --no-serve)."""
    from .demo.run import curl_commands, run_demo

    settings = _settings()
    if not no_serve:
        from .api.server import check

        check(settings, 1)  # refuse a bad token before the demo's work, not after
    result = run_demo(settings, console.get(), bars=bars)
    if no_serve:
        return
    from .api.server import serve

    console.print("\nServing the HTTP API (Ctrl-C stops it). Try:")
    for line in curl_commands(settings, f"http://{host}:{port}", result):
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    serve(settings, host=host, port=port)


# --- stream worker and hot config: sigserve.stream_cli adds `stream` and `config get|set` ----
from . import stream_cli as _stream_cli  # noqa: E402,F401  (registers its commands on app)


# --- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map every refusal to ``error_code: message`` and a non-zero exit."""
    err = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)
    # This process (and any server worker it starts) belongs to sigserve: skip lightgbm's
    # scikit-learn/pandas integrations at import (see runtimes.import_lightgbm).
    os.environ.setdefault("SIGSERVE_LEAN_IMPORTS", "1")
    try:
        app(args=argv, standalone_mode=False, prog_name="sigserve")
    except SigserveError as exc:
        err.print(f"{exc.code}: {exc.message}", markup=False)
        return 2 if isinstance(exc, ValidationError) else 1
    except Exit as exc:
        return int(exc.exit_code or 0)
    except Abort:
        err.print("aborted")
        return 130
    except TyperException as exc:
        err.print(f"validation_error: {exc.format_message()}", markup=False)
        return 2
    except SettingsError as exc:
        problems = "; ".join(f"SIGSERVE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                             for e in exc.errors())
        err.print(f"validation_error: bad settings: {problems}", markup=False)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback only on request
        if os.environ.get("SIGSERVE_DEBUG"):
            raise
        err.print(f"internal_error: unexpected {type(exc).__name__}: {exc}"
                  " (rerun with SIGSERVE_DEBUG=1 for the traceback)", markup=False)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
