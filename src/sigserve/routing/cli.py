"""``sigserve rollout``: start, advance, promote, rollback, status, report.

Each change is validated, every version it names is loaded and sha-verified, and it is stored
with an audit row (actor ``cli:<user>``). A running server picks it up within its
``SIGSERVE_SERVER_PREPARED_TTL_S`` (1 s by default); the admin HTTP endpoints apply it at once.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

rollout_app = typer.Typer(no_args_is_help=True,
                          help="Roll a model version out: shadow -> canary 10% -> 50% -> 100%, or back.")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _apply(signal_id: str, action: str, as_json: bool, **options: Any) -> None:
    from ..cli import _print_json, _run, console
    from .rollout import RolloutService, cli_actor

    async def work(services: Any) -> dict[str, Any]:
        return await RolloutService(services.engine).apply(signal_id, action, cli_actor(), **options)

    result = _run(work)
    if as_json:
        _print_json(result)
        return
    to = result["to"]
    line = f"{signal_id}: {action} -> champion {to['champion']}"
    if to["challenger"] is not None:
        line += f", challenger {to['challenger']} at {to['share']:.0%}"
    if to["shadows"]:
        line += f", shadows {to['shadows']}"
    console.print(line + f" (stage {to['stage']}, by {result['actor']})")


@rollout_app.command("start")
def rollout_start(
    signal_id: Annotated[str, typer.Argument(help="Signal definition id.")],
    version: Annotated[int, typer.Option(help="Candidate model version (the signal's model name).")],
    shadow: Annotated[list[int] | None, typer.Option(help="A version predicted as a shadow only; repeatable.")] = None,
    share: Annotated[float, typer.Option(help="0: shadow stage; else the traffic share at once.")] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a rollout: the candidate is predicted as a shadow on every bar the champion serves."""
    _apply(signal_id, "start", as_json, version=version, shadows=tuple(shadow or ()), share=share)


@rollout_app.command("advance")
def rollout_advance(
    signal_id: Annotated[str, typer.Argument()],
    share: Annotated[float | None, typer.Option(help="Default: the next of 10% -> 50% -> 100%.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Give the challenger the next traffic step."""
    _apply(signal_id, "advance", as_json, share=share)


@rollout_app.command("promote")
def rollout_promote(signal_id: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """The challenger becomes the champion."""
    _apply(signal_id, "promote", as_json)


@rollout_app.command("rollback")
def rollout_rollback(signal_id: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """Drop the challenger: the champion serves all traffic."""
    _apply(signal_id, "rollback", as_json)


@rollout_app.command("status")
def rollout_status(signal_id: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """The policy, the version serving, and the audit rows."""
    from ..cli import _print_json, _run, console
    from .rollout import RolloutService

    async def work(services: Any) -> dict[str, Any]:
        return await RolloutService(services.engine).status(signal_id)

    status = _run(work)
    if as_json:
        _print_json(status)
        return
    policy = status["policy"]
    if policy is None:
        console.print(f"{signal_id}: no rollout; serving {status['model_name']}:{status['serving']}")
    else:
        console.print(f"{signal_id}: stage {policy['stage']}, champion {policy['champion']},"
                      f" challenger {policy['challenger']} at {policy['share']:.0%},"
                      f" shadows {policy['shadows']}")
    for event in status["events"]:
        before = event["from"] or {}
        console.print(f"  {event['at']}  {event['actor']:<20} {event['action']:<8}"
                      f" champion {before.get('champion')}->{event['to']['champion']}"
                      f" challenger {before.get('challenger')}->{event['to']['challenger']}"
                      f" share {before.get('share')}->{event['to']['share']}")


@rollout_app.command("report")
def rollout_report(
    signal_id: Annotated[str, typer.Argument()],
    start: Annotated[str | None, typer.Option()] = None,
    end: Annotated[str | None, typer.Option()] = None,
    horizon: Annotated[int, typer.Option(min=1, help="Bars ahead for the realised return.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Agreement, actions, latency, hit rate and mean forward return per version."""
    from ..cli import _print_json, _run, console
    from ..timeutil import parse_ts
    from .report import comparison_report
    from .rollout import RolloutService

    a = parse_ts(start, field="start") if start else None
    b = parse_ts(end, field="end") if end else None

    async def work(services: Any) -> dict[str, Any]:
        await RolloutService(services.engine).status(signal_id)  # signal_not_found
        return await comparison_report(services.store, signal_id, start=a, end=b, horizon=horizon)

    report = _run(work)
    if as_json:
        _print_json(report)
        return
    console.print(f"{signal_id}: {report['bars']} bars, versions {report['versions']},"
                  f" horizon {horizon} bar(s)")
    for version, stats in report["per_version"].items():
        o = stats["outcomes"]
        console.print(f"  v{version}: {stats['bars']} bars ({stats['shadow_rows']} shadow), actions"
                      f" {stats['actions']}, latency p50 {stats['latency_ms']['p50']} ms,"
                      f" hit rate {o['hit_rate']}, mean return {o['mean_return']}")
    for c in report["comparisons"]:
        console.print(f"  v{c['reference']} vs v{c['version']}: {c['common_bars']} common bars,"
                      f" agreement {c['agreement_rate']}")


def models_ensemble(
    name: Annotated[str, typer.Argument(help="The ensemble's model name.")],
    regime: Annotated[str, typer.Option(help="The regime model, NAME:VERSION (classes = the regimes).")],
    specialist: Annotated[list[str], typer.Option(help="REGIME=NAME:VERSION, one per regime; repeatable.")],
    meta: Annotated[str | None, typer.Option(help="A meta model NAME:VERSION giving the weights"
                                             " (default: the regime probabilities).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a regime-gated ensemble (flavor ensemble) of registered models."""
    from ..cli import _print_json, _run, console
    from ..ensemble import register_ensemble
    from ..errors import ValidationError

    specialists: dict[str, str] = {}
    for item in specialist:
        label, sep, ref = item.partition("=")
        if not sep or not label or not ref:
            raise ValidationError(f"--specialist takes REGIME=NAME:VERSION, not {item!r}")
        specialists[label] = ref

    async def work(services: Any) -> dict[str, Any]:
        card = await register_ensemble(services.registry, name, regime=regime, specialists=specialists,
                                       meta=meta)
        return card.to_dict()

    card = _run(work)
    if as_json:
        _print_json(card)
    else:
        console.print(f"registered {card['name']}:{card['version']} (ensemble of {card['extra']['ensemble']})")
