"""One vocabulary: the job options are declared once (``SCORE_OPTION_DEFAULTS`` in
workers/vocabulary.py) and every place that takes them (the API's ScoreOptions, the worker's
ScoreConfig, the service's SCORE_OPTIONS, the CLI's local ``score`` and remote ``submit``,
``watch`` and ``backfill``) has the same names and, where it has defaults, the same ones."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from layertrack.service import jobs
from layertrack.service.cli import build_parser
from layertrack.service.cli.common import score_options
from layertrack.service.schemas import ScoreOptions
from layertrack.workers.scoring import ScoreConfig
from layertrack.workers.vocabulary import SCORE_OPTION_DEFAULTS, SCORE_OPTIONS

#: ScoreConfig's fields that are not job options: how this machine runs a job (the CLI's
#: ``score`` has options for some), never sent by a submission
WORKER_ONLY = {"batch_size", "device", "stats_memory_budget", "seed", "max_memory", "execution", "engine",
               "compare_to"}
#: the local ``score`` command's options that are not job options
SCORE_LOCAL_ONLY = {"checkpoint", "probe", "batch_size", "device", "seed", "max_memory", "plan", "json",
                    "compare_to", "quiet"}
#: what a submission carries besides its scoring options
SUBMISSION_ONLY = {"phase", "parent_run", "parent_step", "probe", "compare_to"}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)
            and a.dest not in ("help_parser", "func")}


def _command(name: str) -> argparse.ArgumentParser:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_the_service_takes_the_vocabularys_options():
    assert jobs.SCORE_OPTIONS == SCORE_OPTIONS == tuple(SCORE_OPTION_DEFAULTS)


#: in a job's config but not a scoring option: the worker resolves it to the checkpoint it
#: compares with (a step of the run or a path) and hands the scoring that checkpoint
API_ONLY = {"compare_to": None}


def test_the_api_body_has_exactly_the_options_and_their_defaults():
    fields = {f.alias or k: f for k, f in ScoreOptions.model_fields.items()}  # JSON's names
    assert tuple(fields) == SCORE_OPTIONS + tuple(API_ONLY)
    assert {k: f.default for k, f in fields.items()} == SCORE_OPTION_DEFAULTS | API_ONLY
    assert ScoreOptions().model_dump() == SCORE_OPTION_DEFAULTS | API_ONLY


def test_the_worker_config_has_every_option_with_its_default():
    fields = {f.name: f for f in dataclasses.fields(ScoreConfig)}
    assert set(fields) - WORKER_ONLY == set(SCORE_OPTIONS), "a ScoreConfig field neither a job option nor worker-only"
    assert {k: fields[k].default for k in SCORE_OPTIONS} == SCORE_OPTION_DEFAULTS
    assert jobs.score_options(dict(SCORE_OPTION_DEFAULTS, metrics=["cosine"])) == {
        k: v for k, v in SCORE_OPTION_DEFAULTS.items() if v is not None}


def test_the_local_score_command_has_every_option_with_its_default():
    options = _options(_command("score"))
    assert set(options) - SCORE_LOCAL_ONLY == set(SCORE_OPTIONS)
    assert {k: options[k].default for k in SCORE_OPTIONS} == SCORE_OPTION_DEFAULTS


@pytest.mark.parametrize("command", ["submit", "watch", "backfill"])
def test_the_submitting_commands_have_every_option_and_leave_defaults_to_the_service(command):
    options = _options(_command(command))
    submission = set(options) & (set(SCORE_OPTIONS) | SUBMISSION_ONLY)
    assert submission == set(SCORE_OPTIONS) | SUBMISSION_ONLY
    # not given: left out of the job's config, so the service's default (the vocabulary's) applies
    assert {k: options[k].default for k in SCORE_OPTIONS} == {k: False if isinstance(v, bool) else None
                                                            for k, v in SCORE_OPTION_DEFAULTS.items()}
    given = {"max_tokens": 700, "seq_len": 64, "drop_first_token": True, "dtype": "float32", "replaceability": True,
             "holdout_tokens": 32, "logit_lens": True, "allow_pickle": True, "dynamics": False, "format": "dcp",
             "model_config": "/ckpts/llama/config.json", "tokenizer": "/ckpts/tok"}
    assert set(given) == set(SCORE_OPTIONS)
    argv = ["r", "1", "/c"] if command == "submit" else ["/c", "--run", "r"]
    flags = [f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}"
             for k, v in given.items()]
    args = build_parser().parse_args([command, *argv, *flags])
    assert score_options(args) == given
    assert score_options(build_parser().parse_args([command, *argv])) == {}
    ScoreOptions.model_validate(given)  # what the CLI sends, the API takes


def test_delivery_statuses_and_alert_kinds_are_the_vocabularys_enums():
    import typing

    from layertrack.service.schemas import AlertRuleIn, DeliveryOut, DeliveryStatusName
    from layertrack.workers.vocabulary import AlertKind, DeliveryStatus

    assert typing.get_args(DeliveryStatusName) == tuple(s.value for s in DeliveryStatus)
    assert typing.get_args(AlertRuleIn.model_fields["kind"].annotation) == tuple(k.value for k in AlertKind)
    [kind] = [a for a in _options(_alert_create()).values() if a.dest == "kind"]
    assert tuple(kind.choices) == tuple(k.value for k in AlertKind)
    # str enums: stored and sent as their plain values
    assert DeliveryOut.model_fields["status"].annotation is str and DeliveryStatus.pending == "pending"
    assert AlertRuleIn.model_validate({"metric": "cosine", "kind": AlertKind.sigma, "k": 2}).kind == "sigma"


def _alert_create() -> argparse.ArgumentParser:
    [sub] = [a for a in _command("alert")._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["create"]
