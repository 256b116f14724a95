"""The Neural Cleanse cost (lambda) schedule as a vectorised, pure state machine.

One `ScheduleState` holds the schedule of many labels at once (numpy arrays, one entry per
label). `step()` takes each label's attack success and mask L1 of the step just finished
and returns the new state. No torch, no I/O: it is unit-tested on its own.

The rules (Wang et al. 2019 and the authors' code, with its bugs left out):
  * lambda starts at 0 (``init_cost`` is applied once the attack works);
  * once a label's attack success has been >= ``attack_succ_threshold`` for ``patience``
    consecutive steps while lambda is 0, lambda becomes ``init_cost``;
  * then lambda is multiplied by ``cost_multiplier_up`` after ``patience`` successful steps
    and divided by ``cost_multiplier_down`` after ``patience`` failing steps;
  * the best mask is only taken from a step with attack success >= threshold AND a smaller
    L1 than the best so far (not by norm alone);
  * early stop: once lambda has moved both up and down, stop after ``early_stop_patience``
    steps without the best L1 improving (by the factor ``early_stop_threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class ScheduleConfig:
    """Hyperparameters of the cost schedule (defaults: the paper's)."""

    init_cost: float = 1e-3
    attack_succ_threshold: float = 0.99
    patience: int = 5
    cost_multiplier_up: float = 2.0
    cost_multiplier_down: float = 2.0**1.5
    early_stop: bool = True
    early_stop_threshold: float = 1.0
    early_stop_patience: int = 25


@dataclass(frozen=True)
class ScheduleState:
    """Per-label schedule state (all arrays of length L)."""

    cost: np.ndarray
    cost_set_counter: np.ndarray
    cost_up_counter: np.ndarray
    cost_down_counter: np.ndarray
    cost_up_flag: np.ndarray
    cost_down_flag: np.ndarray
    best_l1: np.ndarray  # inf until a successful step
    early_stop_counter: np.ndarray
    early_stop_best: np.ndarray
    steps: np.ndarray
    done: np.ndarray

    @staticmethod
    def init(n: int) -> ScheduleState:
        z = np.zeros(n, np.int64)
        f = np.zeros(n, bool)
        return ScheduleState(
            cost=np.zeros(n, np.float64),
            cost_set_counter=z.copy(),
            cost_up_counter=z.copy(),
            cost_down_counter=z.copy(),
            cost_up_flag=f.copy(),
            cost_down_flag=f.copy(),
            best_l1=np.full(n, np.inf),
            early_stop_counter=z.copy(),
            early_stop_best=np.full(n, np.inf),
            steps=z.copy(),
            done=f.copy(),
        )


def step(
    s: ScheduleState,
    attack_success: np.ndarray,
    l1: np.ndarray,
    cfg: ScheduleConfig,
    active: np.ndarray | None = None,
    verified: np.ndarray | None = None,
) -> tuple[ScheduleState, np.ndarray]:
    """Advance the schedule of the active labels by one step.

    Args:
        s: the current state.
        attack_success: per label, the mean attack success over the step.
        l1: per label, the mask L1 at the end of the step.
        cfg: the schedule's hyperparameters.
        active: which labels took part in this step (default: those not done).
        verified: per label, whether the current mask also passed an independent check of
            its attack success (default: all True). A mask only becomes the best if it did.

    Returns:
        (new state, improved) where `improved[i]` says label i's best mask should be
        replaced by its current mask.
    """
    act = ~s.done if active is None else (active & ~s.done)
    thr = cfg.attack_succ_threshold
    ok = attack_success >= thr

    improved = act & ok & (l1 < s.best_l1)
    if verified is not None:
        improved &= verified
    best_l1 = np.where(improved, l1, s.best_l1)

    # Early stop: counts steps without improvement once a valid trigger exists.
    es_counter = s.early_stop_counter.copy()
    es_best = s.early_stop_best.copy()
    have = np.isfinite(best_l1)
    no_gain = best_l1 >= cfg.early_stop_threshold * es_best
    es_counter = np.where(act & have & no_gain, es_counter + 1, es_counter)
    es_counter = np.where(act & have & ~no_gain, 0, es_counter)
    es_best = np.where(act, np.minimum(best_l1, es_best), es_best)
    stop = (
        act
        & cfg.early_stop
        & s.cost_up_flag
        & s.cost_down_flag
        & (es_counter >= cfg.early_stop_patience)
    )

    cost = s.cost.copy()
    set_c = s.cost_set_counter.copy()
    up_c = s.cost_up_counter.copy()
    down_c = s.cost_down_counter.copy()
    up_f = s.cost_up_flag.copy()
    down_f = s.cost_down_flag.copy()

    # lambda = 0 until the attack has worked for `patience` steps.
    zero = cost == 0
    set_c = np.where(act & zero & ok, set_c + 1, np.where(act, 0, set_c))
    arm = act & zero & (set_c >= cfg.patience)
    cost = np.where(arm, cfg.init_cost, cost)
    up_c = np.where(arm, 0, up_c)
    down_c = np.where(arm, 0, down_c)
    up_f = np.where(arm, False, up_f)
    down_f = np.where(arm, False, down_f)

    # Adjust lambda (only once it is armed: multiplying 0 would do nothing anyway).
    live = act & ~arm & (cost > 0)
    up_c = np.where(live & ok, up_c + 1, np.where(live, 0, up_c))
    down_c = np.where(live & ~ok, down_c + 1, np.where(live, 0, down_c))
    go_up = live & (up_c >= cfg.patience)
    go_down = live & ~go_up & (down_c >= cfg.patience)
    cost = np.where(go_up, cost * cfg.cost_multiplier_up, cost)
    cost = np.where(go_down, cost / cfg.cost_multiplier_down, cost)
    up_c = np.where(go_up, 0, up_c)
    down_c = np.where(go_down, 0, down_c)
    up_f = up_f | go_up
    down_f = down_f | go_down

    new = replace(
        s,
        cost=cost,
        cost_set_counter=set_c,
        cost_up_counter=up_c,
        cost_down_counter=down_c,
        cost_up_flag=up_f,
        cost_down_flag=down_f,
        best_l1=best_l1,
        early_stop_counter=es_counter,
        early_stop_best=es_best,
        steps=np.where(act, s.steps + 1, s.steps),
        done=s.done | stop,
    )
    return new, improved
