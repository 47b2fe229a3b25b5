"""The three training stages of Fashion-FINE, each a small module the trainer is handed.

==========  =================================================================================
pretrain    stage 1: pre-training on FashionGen (ITC-focal + ITM + symbol + MLM + RTP)
retrieval   stage 2: retrieval fine-tuning on FashionGen (ITC-focal + ITM)
tgir        stage 3: text-guided image retrieval on FashionIQ (distilled contrastive loss)
==========  =================================================================================

A :class:`Stage` bundles what differs per stage: its step builder, its queues, the terms it logs,
its training data and its evaluator. The trainer (``fine_jax.trainer``) runs any of them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from fine_jax.stages import data as stage_data
from fine_jax.stages import pretrain, retrieval, tgir


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    make_step: Callable  # (model, optimizer, loss_cfg, steps_per_epoch, schedule, total_steps,
    #                       deterministic) -> step(state, batch, rng) -> (state, metrics)
    make_queues: Callable  # (loss_cfg, embed_dim) -> (rng -> queues)
    log_terms: tuple[str, ...]
    training_data: Callable  # cfg -> stages.data.TrainingData
    evaluator: Callable  # cfg -> an evaluator (fine_jax.eval.evaluators)


def _fashiongen_evaluator(cfg):
    from fine_jax.eval.evaluators import FashionGenEvaluator

    return FashionGenEvaluator.from_config(cfg)


def _fashioniq_evaluator(cfg):
    from fine_jax.eval.evaluators import FashionIQEvaluator

    return FashionIQEvaluator.from_config(cfg)


STAGES = {
    "pretrain": Stage("pretrain", pretrain.make_step, pretrain.make_queues, pretrain.LOG_TERMS,
                      stage_data.pretrain_data, _fashiongen_evaluator),
    "retrieval": Stage("retrieval", retrieval.make_step, retrieval.make_queues,
                       retrieval.LOG_TERMS, stage_data.retrieval_data, _fashiongen_evaluator),
    "tgir": Stage("tgir", tgir.make_step, tgir.make_queues, tgir.LOG_TERMS, stage_data.tgir_data,
                  _fashioniq_evaluator),
}


def get(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        from fine_jax.config import ConfigError

        raise ConfigError(f"stage={name!r}: use one of {', '.join(STAGES)}") from None
