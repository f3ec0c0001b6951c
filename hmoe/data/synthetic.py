r"""The synthetic "ads world": hmoe's embedded default dataset, with planted, known structure.

Real click logs hide what a model should find; this world plants it, so experiments can check
that a model (or an analysis) recovers it. Everything is drawn by vectorised numpy from one seed.

Catalog (drawn once from the seed; independent of ``num_rows``). Ids 0 are reserved for
out-of-vocabulary / padding everywhere, so real ids start at 1; categories are ids 1..C, and the
ground-truth matrices index category id c at row c - 1.

* C categories on a ring. The semantic relation S (C, C), S[b, t] = how much a behaviour in
  category b raises the click logit of a target in category t: 1 on the diagonal, 0.5 for the two
  ring neighbours (related, not equal), -0.5 for the opposite category (C/2 away), else 0.
* Advertisers, each with a home category and a conversion quality N(0, 0.5²); ads, each of its
  advertiser's category (80 %) or a random one, with a lognormal popularity, a click bias
  N(0, 0.3²), a like quality N(0, 0.5²) and a lognormal base price (median 30).
* Users, each with ``interests_per_user`` distinct browse interests clustered on the ring (a
  random centre and, likely, its neighbours; weights ~ Dirichlet(2)), one
  purchase category (half the time one of the interests, else random: where click and conversion
  interests conflict), an age, a click bias N(0, 0.3²), a monthly activity rate and an impression
  volume (lognormal, so a few users have many rows).

Rows (one impression record of a (user, target ad) pair):

* user by volume; target category = one of the user's interests (prob
  ``target_interest_fraction``), the user's purchase category (0.1) or uniform; the target ad by
  popularity within its category. Low-cardinality fields (device 3, slot 8, weekday 7 values,
  further fields 2-8) drawn from fixed skewed distributions.
* behaviour sequence ``hist_ads`` (item ``ad_id``) and, aligned with it, ``hist_categories``
  (item ``ad_category``, the categories of those ads): length uniform in [1, max_len], 0 with
  prob 0.05; each step's category is one of the user's interests (prob ``interest_fraction``,
  by weight) or uniform, its ad drawn by popularity. Stored oldest first, valid steps first;
  position of step i = length - i, so the most recent behaviour has rank 1.
* numerics: ``price`` (the ad's base price × lognormal(0, 0.25²) per row: heavy-tailed),
  ``user_age`` (18..70), ``user_activity`` (clicks last month, Poisson of the user's rate; NaN
  with prob ``missing_rate``), ``hour`` (0..23), then ``noise_<k>`` (lognormal, no effect).

Labels (σ = logistic; z_p = (ln price − ln 30)/1.03, z_a = (age − 35)/15,
z_u = (ln(1 + activity) − 1.7)/0.9 or 0 when missing):

    click logit = b_click + w_seq · Σ_i S[c(b_i), c(target)] · decay(p_i)         (planted map)
                  + user bias + ad bias + Σ_fields click effect
                  − 0.35 z_p  − 0.35 z_a²  + 0.3 z_u  + 0.25 cos(2π (hour − 20) / 24)
                  + w_int · a_d(user, c(target))        (the day's interests: see Days; w_int
                                                          = 0 in a one-day world)
    with decay(p) = exp(−(p − 1) / decay_scale), i over the valid steps, p_i their ranks;
    conversion (only after a click):  logit P(conv | click) = b_conv + 2 [c(target) = purchase
                  category] + advertiser quality − 0.9 z_p + 0.2 z_u + Σ_fields conversion effect
                  (slot 1, the top slot, gets −0.8: accidental clicks; device effects oppose click's)
    like (auxiliary; an engagement with the creative, independent of the click):
                  logit = b_like + 1.5 [c(target) ∈ interests] + ad like quality − 0.3 z_a
                  + Σ_fields like effect

Planted interactions (off by default: ``interaction_rank`` = 0 keeps the world bit-for-bit
what it was before they existed; their factors come from a random stream of their own). With
rank r > 0 each user gets factors P_u ~ N(0, I_r) and each category Q_c ~ N(0, I_r), and

    click logit      += interaction_scale · <P_u, Q_c(target)> / √r
    conversion logit += interaction_scale · <P'_u, Q_c(target)> / √r,
                        P'_u = (1 − κ) P_u + √(1 − (1 − κ)²) R_u,  R_u ~ N(0, I_r)

(κ = ``task_conflict``): each term has standard deviation ``interaction_scale`` whatever r,
so r sets only the complexity (rank) of what an embedding must hold about a user, not its
strength; κ = 0 gives the two tasks the same user factors, κ = 1 independent ones, so a shared
embedding must hold 2r dimensions about each user where each task needs r.

So click is monotone in price and activity, non-monotone (inverted U) in age and periodic in
hour; conversion prefers cheap ads in the purchase category and punishes the slot click likes.

Repeated exposure: a row's (user, ad) pair was shown ``exposure_count`` = k times (k = 1, or with
prob ``repeat_rate`` k = 2 + Poisson(mean_repeated_exposures − 2), at most max_exposures), each
exposure an independent click chance p = σ(click logit). The observed label is "clicked at least
once", P = 1 − (1 − p)^k > p: repeated rows over-state the per-exposure rate, about k-fold for
small p, which is what inverse propensity weighting (positives weighted k^−γ, γ ≈ 1) corrects.
Each split carries the unbiased per-exposure truths outside the batch layout: ``"true/click"``
= p, ``"true/conversion"`` = p · P(conv | click), ``"true/like"`` (and, over days, the row's
``"timestamp"``). Intercepts b are calibrated by bisection (on rows of every day) so the
observed rates match ``click_rate``, ``conversion_rate`` and ``like_rate``.

Days (``days`` = D; default 1). With D > 1 rows carry ``timestamp`` (int64 seconds; a column
outside the batch layout that batches carry along, for ``data.time_column``); day d covers
[d · 86400, (d + 1) · 86400), so windows of "1d" on it are the days. The rows of a day are
i.i.d. given that day's state, spread over it in time order. A one-day world has no timestamp
column: its splits and files stay exactly what they were before days existed. With D > 1 the
world changes from day to day (day 0 is the catalog above):

* interests drift: user u's interests all move together along the ring by a shift s_{u,d}, a
  random walk (s_{u,0} = 0, a day's step N(0, ``interest_drift``²)); interest i on day d is
  the day-0 one moved by round(s_{u,d}) categories (weights do not change). Targets,
  behaviours and the like logit use the day's interests; the purchase category stays.
* the click logit adds w_int · a_d(u, c(target)), the user's taste for the target's category
  that day: a_d(u, c) = Σ_i weight_i · S[interest_i on day d, c] (w_int = ``interest_weight``;
  by default 3.0 for D > 1 and 0.0 for D = 1, which keeps the one-day world bit-for-bit what it
  was before days existed). A predictor with day-0 interests loses AUC day after day.
* new ads: a fraction ``new_ad_fraction`` of the ads, the highest ids, is born on a day in
  [1, D - 1] (in id order) and served only from then on: a vocabulary fitted on earlier days
  has never seen them.
* retired ads: a fraction ``retired_ad_fraction`` is last served on a day in [birth, D - 2].
  Ads 1..C (one per category) are always served.
* histories hold ads served before the row's day began (ads born on day 0 were served before
  the log), so no behaviour comes after its row; they follow the day's interests.
* ``hour`` is the hour of the timestamp (one day: drawn per row, as before; ``weekday`` is a
  drawn field either way).

Ground truth of days: ``days``, ``interest_weight`` (w_int as used), ``ad_birth_day`` and
``ad_last_day`` (A + 1,) (an ad is served on days birth..last), ``user_interest_shift``
(D, U + 1) the walks s_{u,d}, ``user_interests_by_day`` (D, U + 1, I) the interests each day
(row 0 = ``user_interests``); :meth:`GroundTruth.interest_affinity` gives a_d(u, c) and
:meth:`GroundTruth.served` whether an ad is served on a day.

Splits: each day's rows are a train, a valid and a test slice (the fractions of that day's
rows), so every split spans all the days in time order (rows sorted by timestamp); with one
day they are consecutive slices of the rows, as before. ``seq/hist_categories`` shares the
lengths and positions arrays of ``seq/hist_ads``.

Reproducibility: the same config gives the same world bit for bit on one machine and numpy
build. Across machines it can differ in the last bits of the float columns (and, rarely, a
label): numpy's exp, log and tanh take different code paths with and without AVX-512.

Generation runs chunk by chunk (:class:`_Generator`): :func:`generate` collects the chunks in
memory, :func:`write_world` (``hmoe generate``) writes them straight to disk, so a world of any
size is made in bounded memory (day by day, a chunk at a time, in time order); both give the
same rows for the same config.
:func:`open_world` opens a saved world for streaming (each split a Parquet store read a row group
at a time), :func:`load_world` reads it into memory.

Files (:meth:`SyntheticWorld.save`, :func:`write_world`): ``<split>.parquet`` with one column per
feature (categorical int64, numeric float32 with NaN, sequences as list<int64> columns holding the
valid ids oldest first — positions are ranks and are recomputed on load — pretrained vectors as
fixed-size list<float32> columns under their user/item column names), one float32 column per
label, ``exposure_count``, ``true/<task>``, ``timestamp`` (int64, days > 1); row groups of
:data:`hmoe.data.store.ROW_GROUP_ROWS` rows (the stream's units); plus ``schema.yaml``,
``config.yaml`` and ``ground_truth.npz``. The per-feature columns are also what a raw Parquet
click log looks like, so preprocessing reads these files too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmoe.data.schema import (
    CategoricalFeature,
    Label,
    NumericFeature,
    PretrainedFeature,
    Schema,
    SequenceFeature,
    dump_schema,
    load_schema,
)

__all__ = ["GroundTruth", "SyntheticConfig", "SyntheticWorld", "WorldFiles", "generate",
           "load_world", "open_world", "write_world"]

SPLITS = ("train", "valid", "test")
LOW_CARD_FIELDS = (("device", 3), ("slot", 8), ("weekday", 7))  # then field_<k> with 2-8 values
NUMERIC_FIELDS = ("price", "user_age", "user_activity", "hour")  # then noise_<k>
TASKS = ("click", "conversion", "like")
ZERO_LENGTH_RATE = 0.05
PURCHASE_TARGET_RATE = 0.1
_CHUNK_ROWS = 65_536  # rows generated at once: bounds the (rows, L) temporaries
_CALIBRATION_ROWS = 200_000  # rows the intercepts (and quantile boundaries) are fitted on
SECONDS_PER_DAY = 86_400
_INTERACTION_STREAM = 0x1A7E  # the planted interactions' own random stream (with the seed)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes, rates and the seed of a synthetic world (see the module docstring for the model)."""

    num_rows: int = 200_000
    num_users: int = 4_000
    num_ads: int = 10_000
    num_advertisers: int = 500
    num_categories: int = 16
    interests_per_user: int = 3
    max_len: int = 50
    num_low_card_fields: int = 3
    num_numeric: int = 4
    pretrained_dim: int = 8  # 0: no pre-trained vector feature
    click_rate: float = 0.07  # observed (any exposure clicked)
    conversion_rate: float = 0.02  # observed, < click_rate
    like_rate: float = 0.04
    repeat_rate: float = 0.2  # rows whose pair was shown more than once
    mean_repeated_exposures: float = 3.0  # mean exposure_count of those rows, >= 2
    max_exposures: int = 10
    missing_rate: float = 0.05  # NaN rate of user_activity
    sequence_weight: float = 1.0  # w_seq, the planted map's scale
    decay_scale: float = 5.0  # decay(p) = exp(-(p - 1) / decay_scale)
    interest_fraction: float = 0.8  # behaviours drawn from the user's interests
    target_interest_fraction: float = 0.5  # targets drawn from the user's interests
    days: int = 1  # the log covers days 0..days-1 (see "Days" in the module docstring)
    interest_drift: float = 0.5  # std of a day's step of each user's walk on the ring
    interest_weight: float | None = None  # w_int; None: 3.0 when days > 1, else 0.0
    new_ad_fraction: float = 0.2  # ads first served after day 0 (days > 1)
    retired_ad_fraction: float = 0.1  # ads last served before the last day (days > 1)
    interaction_rank: int = 0  # r of the planted user x category interaction; 0: none
    interaction_scale: float = 1.0  # its standard deviation in the click/conversion logit
    task_conflict: float = 0.0  # kappa: conversion's user factors, 0 = click's, 1 = independent
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ValueError(f"SyntheticConfig.{key}: must be {what}, got "
                                 f"{getattr(self, key)!r}")

        for key in ("num_rows", "num_users", "num_ads", "num_advertisers", "max_len",
                    "max_exposures", "days"):
            value = getattr(self, key)
            need(isinstance(value, int) and value >= 1, key, "an int >= 1")
        for key in ("num_low_card_fields", "num_numeric", "pretrained_dim"):
            value = getattr(self, key)
            need(isinstance(value, int) and value >= 0, key, "an int >= 0")
        need(isinstance(self.num_categories, int) and self.num_categories >= 4, "num_categories",
             "an int >= 4")
        need(self.num_ads >= self.num_categories, "num_ads", f">= num_categories "
             f"({self.num_categories}) so that every category has an ad")
        need(isinstance(self.interests_per_user, int)
             and 1 <= self.interests_per_user <= self.num_categories, "interests_per_user",
             f"an int in [1, num_categories = {self.num_categories}]")
        for key in ("click_rate", "conversion_rate", "like_rate"):
            need(0 < getattr(self, key) < 1, key, "in (0, 1)")
        need(self.conversion_rate < self.click_rate, "conversion_rate",
             f"< click_rate ({self.click_rate}): conversions follow clicks")
        for key in ("repeat_rate", "missing_rate", "interest_fraction",
                    "target_interest_fraction"):
            need(0 <= getattr(self, key) <= 1, key, "in [0, 1]")
        need(self.target_interest_fraction + PURCHASE_TARGET_RATE <= 1,
             "target_interest_fraction", f"<= {1 - PURCHASE_TARGET_RATE}")
        need(2 <= self.mean_repeated_exposures <= max(self.max_exposures, 2),
             "mean_repeated_exposures", f"in [2, max_exposures = {self.max_exposures}]")
        need(self.decay_scale > 0, "decay_scale", "> 0")
        need(math.isfinite(self.sequence_weight), "sequence_weight", "finite")
        need(math.isfinite(self.interest_drift) and self.interest_drift >= 0, "interest_drift",
             "finite and >= 0")
        weight = self.interest_weight
        need(weight is None or (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                                and math.isfinite(weight)), "interest_weight",
             "None or a finite number")
        need(isinstance(self.interaction_rank, int) and not isinstance(self.interaction_rank, bool)
             and self.interaction_rank >= 0, "interaction_rank", "an int >= 0")
        need(isinstance(self.interaction_scale, (int, float)) and math.isfinite(
            self.interaction_scale) and self.interaction_scale >= 0, "interaction_scale",
             "finite and >= 0")
        need(isinstance(self.task_conflict, (int, float)) and 0 <= self.task_conflict <= 1,
             "task_conflict", "in [0, 1]")
        for key in ("new_ad_fraction", "retired_ad_fraction"):
            need(0 <= getattr(self, key) < 1, key, "in [0, 1)")
        need(self.valid_fraction >= 0 and self.test_fraction >= 0
             and self.valid_fraction + self.test_fraction < 1, "valid_fraction",
             "with test_fraction >= 0 and summing to < 1")

    @property
    def click_interest_weight(self) -> float:
        """w_int as used: ``interest_weight``, or by default 3.0 for a world of several days and
        0.0 for one day (which keeps the one-day world what it was before days existed)."""
        if self.interest_weight is not None:
            return float(self.interest_weight)
        return 3.0 if self.days > 1 else 0.0


@dataclass
class GroundTruth:
    """The planted structure. Category id c (1..C) is row/column c - 1 of ``relation`` and of
    the correlation map; position p (1..P, rank 1 = most recent) is entry p - 1 of ``decay``;
    the per-id arrays are indexed by id (entry 0 belongs to the OOV id and holds 0)."""

    relation: np.ndarray  # (C, C) S[behaviour category, target category]
    decay: np.ndarray  # (P,)
    sequence_weight: float  # w_seq
    ad_category: np.ndarray  # (A + 1,) category id of each ad id
    ad_advertiser: np.ndarray  # (A + 1,) advertiser id of each ad id
    advertiser_category: np.ndarray  # (V + 1,) home category id of each advertiser
    user_interests: np.ndarray  # (U + 1, I) category ids of each user's browse interests
    user_interest_weights: np.ndarray  # (U + 1, I) their weights, rows sum to 1
    user_purchase_category: np.ndarray  # (U + 1,)
    field_click_effect: np.ndarray  # (F_low, max card + 1) logit effect of each value id
    field_conversion_effect: np.ndarray  # (F_low, max card + 1)
    field_like_effect: np.ndarray  # (F_low, max card + 1)
    click_intercept: float
    conversion_intercept: float
    like_intercept: float
    # Days (see "Days" in the module docstring); a one-day world: D = 1, every ad served on day 0.
    days: int  # D
    interest_weight: float  # w_int, the click-logit weight of the interest affinity
    ad_birth_day: np.ndarray  # (A + 1,) first day each ad is served (0: from the start)
    ad_last_day: np.ndarray  # (A + 1,) last day each ad is served (D - 1: never retired)
    user_interest_shift: np.ndarray  # (D, U + 1) each user's walk on the ring, 0 on day 0
    user_interests_by_day: np.ndarray  # (D, U + 1, I) day d's browse interests; [0] = day 0's
    # Planted interactions (interaction_rank r; all (0, 0) when r = 0): P (U + 1, r), Q (C, r),
    # P' (U + 1, r) and the scale; see "Planted interactions" in the module docstring.
    interaction_user: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))
    interaction_category: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 0)))
    conversion_interaction_user: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 0)))
    interaction_scale: float = 0.0

    def interest_affinity(self, users: np.ndarray, categories: np.ndarray,
                          day: int | np.ndarray) -> np.ndarray:
        """a_d(u, c) = Σ_i weight_i · S[interest_i, c] over user u's interests on day d: how
        much the user likes category id c that day (the click logit adds w_int times it).
        users, categories and day broadcast together (day an int or per-row days)."""
        users, categories, day = np.broadcast_arrays(np.asarray(users), np.asarray(categories),
                                                     np.asarray(day))
        interests = self.user_interests_by_day[day, users]  # (..., I)
        weights = self.user_interest_weights[users]  # (..., I): weights do not drift
        relation = self.relation[np.maximum(interests, 1) - 1, categories[..., None] - 1]
        return (weights * np.where(interests > 0, relation, 0.0)).sum(-1)

    def served(self, ads: np.ndarray, day: int | np.ndarray) -> np.ndarray:
        """Whether each ad id is served (can be a target) on ``day``."""
        ads = np.asarray(ads)
        return (self.ad_birth_day[ads] <= day) & (day <= self.ad_last_day[ads])

    def correlation_map(self, target_category: int) -> np.ndarray:
        """The planted click-logit contribution of one behaviour in category c at position p,
        for a target of category id ``target_category``: w_seq · S[c, c_t] · decay(p), shape
        (C, P) (row c - 1, column p - 1)."""
        num_categories = self.relation.shape[0]
        if not 1 <= target_category <= num_categories:
            raise ValueError(f"target_category must be a category id in [1, {num_categories}], "
                             f"got {target_category}")
        column = self.relation[:, target_category - 1]  # (C,)
        return self.sequence_weight * column[:, None] * self.decay[None, :]  # (C, P)

    def save(self, path: str | Path) -> None:
        np.savez(path, **{f.name: np.asarray(getattr(self, f.name))
                          for f in dataclasses.fields(self)})

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        with np.load(path) as arrays:
            values = {f.name: arrays[f.name] for f in dataclasses.fields(cls)
                      if f.name in arrays}
        if "days" not in values:  # saved before worlds had days: one day, nothing drifts
            ads = len(values["ad_category"])
            values.update(days=1, interest_weight=0.0, ad_birth_day=np.zeros(ads, np.int64),
                          ad_last_day=np.zeros(ads, np.int64),
                          user_interest_shift=np.zeros((1, len(values["user_interests"]))),
                          user_interests_by_day=values["user_interests"][None])
        for f in dataclasses.fields(cls):
            if f.type in ("float", "int") and f.name in values:  # (absent: its default)
                values[f.name] = {"float": float, "int": int}[f.type](values[f.name])
        return cls(**values)


@dataclass
class SyntheticWorld:
    """A generated world: its schema (vocab sizes and quantizer settings filled), the splits
    (dicts of numpy columns in the batch layout, plus ``"true/<task>"`` and, with days > 1,
    ``"timestamp"``: rows in time order) and the ground truth."""

    config: SyntheticConfig
    schema: Schema
    splits: dict[str, dict[str, np.ndarray]]
    ground_truth: GroundTruth

    def save(self, directory: str | Path) -> Path:
        """Writes the world into ``directory`` (created if needed; see the module docstring)."""
        import pyarrow.parquet as pq

        from hmoe.data.store import ROW_GROUP_ROWS

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, columns in self.splits.items():
            pq.write_table(_columns_to_table(columns, self.schema), directory / f"{name}.parquet",
                           row_group_size=ROW_GROUP_ROWS)
        _write_world_meta(directory, self.config, self.schema, self.ground_truth)
        return directory


@dataclass
class WorldFiles:
    """A saved world opened for streaming: each split a Parquet store read a row group at a
    time (:class:`hmoe.data.store.ParquetStore`), nothing loaded yet."""

    config: SyntheticConfig
    schema: Schema
    stores: dict  # split -> ParquetStore
    ground_truth: GroundTruth


def open_world(directory: str | Path) -> WorldFiles:
    """Opens a world written by :meth:`SyntheticWorld.save` or :func:`write_world`."""
    import yaml

    from hmoe.data.store import ParquetStore

    directory = Path(directory)
    for name in ("schema.yaml", "config.yaml", "ground_truth.npz"):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is not a saved synthetic world: it lacks {name}")
    schema = load_schema(directory / "schema.yaml")
    config = SyntheticConfig(**yaml.safe_load((directory / "config.yaml").read_text("utf-8")))
    stores = {name: ParquetStore(directory / f"{name}.parquet", schema,
                                 decode=lambda rows: _table_to_columns(rows, schema))
              for name in SPLITS if (directory / f"{name}.parquet").is_file()}
    return WorldFiles(config, schema, stores, GroundTruth.load(directory / "ground_truth.npz"))


def load_world(directory: str | Path) -> SyntheticWorld:
    """Reads a world written by :meth:`SyntheticWorld.save` into memory."""
    files = open_world(directory)
    splits = {name: store.columns() for name, store in files.stores.items()}
    return SyntheticWorld(files.config, files.schema, splits, files.ground_truth)


# --------------------------------------------------------------------------------------------
# The catalog: categories, advertisers, ads, users.


def _ring_distance(num_categories: int) -> np.ndarray:
    """(C, C) distances of the categories on a ring of C."""
    index = np.arange(num_categories)
    offset = np.abs(index[:, None] - index[None, :])
    return np.minimum(offset, num_categories - offset)


def _relation_matrix(num_categories: int) -> np.ndarray:
    """S (C, C) on a ring: 1 same, 0.5 neighbour, -0.5 opposite, 0 otherwise."""
    ring_distance = _ring_distance(num_categories)  # (C, C)
    relation = np.zeros((num_categories, num_categories))
    relation[ring_distance == 0] = 1.0
    relation[ring_distance == 1] = 0.5
    relation[ring_distance == num_categories // 2] = -0.5
    return relation


@dataclass
class _Catalog:
    """Per-entity draws, indexed by id (entry 0 unused)."""

    ad_category: np.ndarray  # (A + 1,) category ids
    ad_advertiser: np.ndarray  # (A + 1,)
    ad_click_bias: np.ndarray
    ad_like_quality: np.ndarray
    ad_base_price: np.ndarray
    ad_vector: np.ndarray  # (A + 1, P)
    advertiser_category: np.ndarray  # (V + 1,)
    advertiser_quality: np.ndarray
    user_volume: np.ndarray  # (U,) row-sampling probabilities of user ids 1..U
    user_interests: np.ndarray  # (U + 1, I)
    user_interest_cumweights: np.ndarray  # (U + 1, I) cumulative, last = 1
    user_interest_weights: np.ndarray
    user_purchase_category: np.ndarray
    user_age: np.ndarray
    user_click_bias: np.ndarray
    user_activity_rate: np.ndarray
    user_vector: np.ndarray  # (U + 1, P)
    field_cardinalities: tuple[int, ...]
    field_probabilities: list[np.ndarray]  # each (card,) over value ids 1..card
    field_click_effect: np.ndarray  # (F_low, max card + 1)
    field_conversion_effect: np.ndarray
    field_like_effect: np.ndarray
    ad_popularity: np.ndarray  # (A + 1,)
    ads: _AdSampler  # every ad
    # planted interactions (None when interaction_rank = 0): P, Q, P' of the module docstring
    interaction_user: np.ndarray | None = None  # (U + 1, r), row 0 zero
    interaction_category: np.ndarray | None = None  # (C, r) by category id - 1
    conversion_interaction_user: np.ndarray | None = None  # (U + 1, r)


@dataclass
class _AdSampler:
    """Popularity sampling within a category among some ads: those ads sorted by category,
    their cumulative popularity, and each category's [first, last] slot in that order."""

    ads_by_category: np.ndarray  # (A',) ad ids
    cumulative_popularity: np.ndarray  # (A',)
    category_first: np.ndarray  # (C,)
    category_last: np.ndarray  # (C,)
    category_mass_start: np.ndarray  # (C,)
    category_mass: np.ndarray  # (C,)


def _ad_sampler(ad_category: np.ndarray, popularity: np.ndarray, num_categories: int,
                ids: np.ndarray | None = None) -> _AdSampler:
    """The sampler of ad ids ``ids`` (ascending; None: all), each category holding one at least.
    ``ad_category`` and ``popularity`` are indexed by id."""
    ids = np.arange(1, len(ad_category)) if ids is None else ids
    order = ids[np.argsort(ad_category[ids], kind="stable")]  # (A',) ad ids, by category
    cumulative = np.cumsum(popularity[order])
    counts = np.bincount(ad_category[ids] - 1, minlength=num_categories)  # (C,)
    category_last = np.cumsum(counts) - 1
    category_first = category_last - counts + 1
    mass_end = cumulative[category_last]
    mass_start = np.where(category_first > 0, cumulative[np.maximum(category_first - 1, 0)], 0.0)
    return _AdSampler(ads_by_category=order, cumulative_popularity=cumulative,
                      category_first=category_first, category_last=category_last,
                      category_mass_start=mass_start, category_mass=mass_end - mass_start)


def _make_catalog(config: SyntheticConfig, rng: np.random.Generator) -> _Catalog:
    C, A, V, U, I = (config.num_categories, config.num_ads, config.num_advertisers,
                     config.num_users, config.interests_per_user)
    dim = config.pretrained_dim
    category_vectors = rng.normal(size=(C, dim))  # (C, P) the pre-trained "semantic" space

    advertiser_category = np.concatenate([[0], rng.integers(1, C + 1, size=V)])
    advertiser_quality = np.concatenate([[0.0], rng.normal(0, 0.5, size=V)])

    ad_advertiser = np.concatenate([[0], rng.integers(1, V + 1, size=A)])
    own = rng.random(A) < 0.8
    ad_category = np.where(own, advertiser_category[ad_advertiser[1:]],
                           rng.integers(1, C + 1, size=A))
    ad_category[:C] = np.arange(1, C + 1)  # every category has an ad
    ad_category = np.concatenate([[0], ad_category])
    popularity = rng.lognormal(0.0, 1.0, size=A)
    ad_click_bias = np.concatenate([[0.0], rng.normal(0, 0.3, size=A)])
    ad_like_quality = np.concatenate([[0.0], rng.normal(0, 0.5, size=A)])
    ad_base_price = np.concatenate([[0.0], rng.lognormal(math.log(30.0), 1.0, size=A)])
    ad_vector = np.zeros((A + 1, dim))
    ad_vector[1:] = category_vectors[ad_category[1:] - 1] + rng.normal(0, 0.5, size=(A, dim))

    popularity = np.concatenate([[0.0], popularity])  # (A + 1,) by id

    # Distinct interests clustered on the ring, as related categories co-occur in real tastes:
    # the top I of Gumbel noise + 2 at a random centre + 1 at its two neighbours (Gumbel top-k
    # samples without replacement from softmax(bonus)).
    centre = rng.integers(0, C, size=U)
    distance = _ring_distance(C)[centre]  # (U, C)
    bonus = 2.0 * (distance == 0) + 1.0 * (distance == 1)
    scores = bonus + rng.gumbel(size=(U, C))
    interests = np.argsort(-scores, axis=1)[:, :I] + 1  # (U, I) category ids
    weights = rng.dirichlet(np.full(I, 2.0), size=U)  # (U, I)
    purchase = np.where(rng.random(U) < 0.5, interests[np.arange(U), rng.integers(0, I, size=U)],
                        rng.integers(1, C + 1, size=U))
    user_vector = np.zeros((U + 1, dim))
    user_vector[1:] = (np.einsum("ui,uip->up", weights, category_vectors[interests - 1])
                       + rng.normal(0, 0.3, size=(U, dim)))
    volume = rng.lognormal(0.0, 0.8, size=U)

    cardinalities = [card for _, card in LOW_CARD_FIELDS[:config.num_low_card_fields]]
    cardinalities += rng.integers(2, 9, size=max(0, config.num_low_card_fields - 3)).tolist()
    width = max(cardinalities, default=0) + 1
    click_effect, conversion_effect, like_effect = (np.zeros((len(cardinalities), width))
                                                    for _ in range(3))
    probabilities = []
    for f, card in enumerate(cardinalities):
        probabilities.append(rng.dirichlet(np.full(card, 3.0)))
        if f == 1:  # slot: top slots get more clicks; slot 1's clicks convert badly
            click_effect[f, 1:card + 1] = np.linspace(0.6, -0.4, card)
            conversion_effect[f, 1] = -0.8
        else:  # e.g. device: what clicks converts less (conflicting tasks)
            click_effect[f, 1:card + 1] = rng.normal(0, 0.2, size=card)
            conversion_effect[f, 1:card + 1] = (-0.8 * click_effect[f, 1:card + 1]
                                                + rng.normal(0, 0.1, size=card))
        like_effect[f, 1:card + 1] = rng.normal(0, 0.15, size=card)

    def with_zero_row(values):
        return np.concatenate([np.zeros((1,) + values.shape[1:], values.dtype), values])

    return _Catalog(
        ad_category=ad_category, ad_advertiser=ad_advertiser, ad_click_bias=ad_click_bias,
        ad_like_quality=ad_like_quality, ad_base_price=ad_base_price, ad_vector=ad_vector,
        advertiser_category=advertiser_category, advertiser_quality=advertiser_quality,
        user_volume=volume / volume.sum(), user_interests=with_zero_row(interests),
        user_interest_cumweights=with_zero_row(np.cumsum(weights, axis=1)),
        user_interest_weights=with_zero_row(weights),
        user_purchase_category=with_zero_row(purchase),
        user_age=with_zero_row(18 + np.rint(52 * rng.beta(2.0, 3.0, size=U))),
        user_click_bias=with_zero_row(rng.normal(0, 0.3, size=U)),
        user_activity_rate=with_zero_row(np.exp(rng.normal(1.5, 1.0, size=U))),
        user_vector=user_vector, field_cardinalities=tuple(cardinalities),
        field_probabilities=probabilities, field_click_effect=click_effect,
        field_conversion_effect=conversion_effect, field_like_effect=like_effect,
        ad_popularity=popularity, ads=_ad_sampler(ad_category, popularity, C),
        **_make_interactions(config))


def _make_interactions(config: SyntheticConfig) -> dict[str, np.ndarray]:
    """The planted interaction factors (module docstring), from a random stream of their own so
    that the rest of the world does not change with them."""
    r = config.interaction_rank
    if r == 0:
        return {}
    rng = np.random.default_rng([config.seed, _INTERACTION_STREAM])
    U, C, kappa = config.num_users, config.num_categories, config.task_conflict
    users = np.zeros((U + 1, r))
    users[1:] = rng.normal(size=(U, r))
    categories = rng.normal(size=(C, r))
    independent = np.zeros((U + 1, r))
    independent[1:] = rng.normal(size=(U, r))
    conversion = (1 - kappa) * users + math.sqrt(1 - (1 - kappa) ** 2) * independent
    return {"interaction_user": users, "interaction_category": categories,
            "conversion_interaction_user": conversion}


def _sample_ads(sampler: _AdSampler, category_ids: np.ndarray,
                uniform: np.ndarray) -> np.ndarray:
    """Ad ids drawn by popularity within the given categories (any shape; ``uniform`` in [0, 1)
    of the same shape)."""
    c = category_ids - 1
    target_mass = sampler.category_mass_start[c] + uniform * sampler.category_mass[c]
    slot = np.searchsorted(sampler.cumulative_popularity, target_mass, side="right")
    # Rounding can land one slot outside the category; clamp to its range.
    slot = np.clip(slot, sampler.category_first[c], sampler.category_last[c])
    return sampler.ads_by_category[slot]


def _sample_interests(catalog: _Catalog, day: _Day, users: np.ndarray,
                      uniform: np.ndarray) -> np.ndarray:
    """One of the user's browse interests that day (a category id) per entry, by weight.
    users (n,), uniform (n, ...) -> (n, ...)."""
    cumweights = catalog.user_interest_cumweights[users]  # (n, I)
    shape = (len(users),) + (1,) * (uniform.ndim - 1) + (cumweights.shape[1],)
    index = (uniform[..., None] >= cumweights.reshape(shape)).sum(-1)  # (n, ...)
    index = np.minimum(index, cumweights.shape[1] - 1)
    interests = day.user_interests[users]  # (n, I)
    return np.take_along_axis(interests, index.reshape(len(users), -1), axis=1).reshape(index.shape)


# --------------------------------------------------------------------------------------------
# Days: drifting interests, new and retired ads.


@dataclass
class _Timeline:
    """What changes from day to day (all of it the ground truth records)."""

    ad_birth_day: np.ndarray  # (A + 1,)
    ad_last_day: np.ndarray  # (A + 1,)
    user_interest_shift: np.ndarray  # (D, U + 1) ring steps since day 0
    user_interests: np.ndarray  # (D, U + 1, I) category ids


@dataclass
class _Day:
    """What the rows of one day draw from: the users' interests that day, the ads served
    (targets) and the ads a history can hold (served that day and already the day before)."""

    index: int
    user_interests: np.ndarray  # (U + 1, I)
    targets: _AdSampler
    behaviours: _AdSampler


def _make_timeline(config: SyntheticConfig, catalog: _Catalog,
                   rng: np.random.Generator | None) -> _Timeline:
    """Births and retirements of ads and the users' interests day by day (``rng`` is not used
    for a one-day world: nothing changes).

    New ads are the highest ids (ids are handed out as ads arrive), born on days uniform in
    [1, D - 1], in id order; retired ads are a random set whose last day is uniform in
    [birth, D - 2]. Ads 1..C (one per category) are always served. A user's interests move
    together on the ring (a taste drifts as a whole, its clustered shape kept): a shift that
    walks by N(0, interest_drift²) a day, each interest the day-0 one moved by the shift
    rounded (weights stay)."""
    A, C, D, U = config.num_ads, config.num_categories, config.days, config.num_users
    birth, last = np.zeros(A + 1, np.int64), np.full(A + 1, D - 1, np.int64)
    interests = catalog.user_interests  # (U + 1, I)
    shift = np.zeros((D, len(interests)))  # (D, U + 1)
    if D == 1:
        return _Timeline(birth, last, shift, interests[None])
    num_new = min(int(config.new_ad_fraction * A), A - C)
    birth[A + 1 - num_new:] = np.sort(rng.integers(1, D, size=num_new))
    candidates = np.flatnonzero(birth[C + 1:] <= D - 2) + C + 1  # ids that can retire
    num_retired = min(int(config.retired_ad_fraction * A), len(candidates))
    retired = rng.choice(candidates, size=num_retired, replace=False)
    last[retired] = rng.integers(birth[retired], D - 1)  # in [birth, D - 2]

    shift[1:, 1:] = np.cumsum(rng.normal(0.0, config.interest_drift, size=(D - 1, U)), axis=0)
    moved = interests[None] - 1 + np.rint(shift).astype(np.int64)[:, :, None]  # (D, U + 1, I)
    by_day = np.mod(moved, C) + 1
    by_day[:, 0] = 0  # the OOV user
    return _Timeline(birth, last, shift, by_day)


def _make_day(config: SyntheticConfig, catalog: _Catalog, timeline: _Timeline,
              day: int) -> _Day:
    if config.days == 1:  # the catalog's own arrays: the one-day world as it always was
        return _Day(0, catalog.user_interests, catalog.ads, catalog.ads)
    birth, last = timeline.ad_birth_day[1:], timeline.ad_last_day[1:]
    served = (birth <= day) & (day <= last)  # (A,)
    # a history's ads were served before the row's day began (day-0 ads: before the log)
    seen = served & ((birth < day) | (birth == 0))

    def sampler(mask):
        return _ad_sampler(catalog.ad_category, catalog.ad_popularity, config.num_categories,
                           np.flatnonzero(mask) + 1)

    return _Day(day, timeline.user_interests[day], sampler(served), sampler(seen))


# --------------------------------------------------------------------------------------------
# Rows.

_PRICE_MEDIAN_LOG, _PRICE_SPREAD = math.log(30.0), 1.03
_AGE_PEAK, _AGE_SPREAD = 35.0, 15.0
_ACTIVITY_MEAN, _ACTIVITY_SPREAD = 1.7, 0.9


def _generate_chunk(config: SyntheticConfig, catalog: _Catalog, day: _Day, relation: np.ndarray,
                    decay: np.ndarray, timestamps: np.ndarray,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of ``day`` at ``timestamps`` (n,): features, exposure counts and the three label
    logits without intercepts."""
    C, L, n = config.num_categories, config.max_len, len(timestamps)
    users = rng.choice(len(catalog.user_volume), size=n, p=catalog.user_volume) + 1  # (n,)

    # Target: an interest, the purchase category, or anything.
    mix = rng.random(n)
    target_category = np.where(
        mix < config.target_interest_fraction,
        _sample_interests(catalog, day, users, rng.random(n)),
        np.where(mix < config.target_interest_fraction + PURCHASE_TARGET_RATE,
                 catalog.user_purchase_category[users], rng.integers(1, C + 1, size=n)))
    ads = _sample_ads(day.targets, target_category, rng.random(n))  # (n,)
    advertisers = catalog.ad_advertiser[ads]

    fields = np.zeros((n, len(catalog.field_cardinalities)), dtype=np.int64)  # (n, F_low)
    for f, probabilities in enumerate(catalog.field_probabilities):
        fields[:, f] = rng.choice(len(probabilities), size=n, p=probabilities) + 1

    # Behaviours: length, then per step a category and an ad; padding after the valid steps.
    lengths = np.where(rng.random(n) < ZERO_LENGTH_RATE, 0, rng.integers(1, L + 1, size=n))
    steps = np.arange(L)
    valid = steps[None, :] < lengths[:, None]  # (n, L)
    from_interest = rng.random((n, L)) < config.interest_fraction
    behaviour_category = np.where(from_interest, _sample_interests(catalog, day, users,
                                                                    rng.random((n, L))),
                                  rng.integers(1, C + 1, size=(n, L)))
    behaviour_category = np.where(valid, behaviour_category, 0)  # (n, L)
    behaviour_ads = np.where(valid, _sample_ads(day.behaviours,
                                                np.maximum(behaviour_category, 1),
                                                rng.random((n, L))), 0)  # (n, L)
    positions = np.where(valid, lengths[:, None] - steps[None, :], 0)  # (n, L) rank, 1 = newest

    # The planted behaviour x target x recency term.
    pair_relation = relation[np.maximum(behaviour_category, 1) - 1, target_category[:, None] - 1]
    step_decay = decay[np.maximum(positions, 1) - 1]
    sequence_term = np.where(valid, pair_relation * step_decay, 0.0).sum(1)  # (n,)

    # Numerics.
    price = catalog.ad_base_price[ads] * rng.lognormal(0.0, 0.25, size=n)
    age = catalog.user_age[users]
    activity = rng.poisson(catalog.user_activity_rate[users]).astype(np.float64)
    activity[rng.random(n) < config.missing_rate] = np.nan
    hour = rng.integers(0, 24, size=n).astype(np.float64)
    if config.days > 1:  # the hour of the row's timestamp (one day: drawn, as it always was)
        hour = (timestamps % SECONDS_PER_DAY // 3600).astype(np.float64)
    numerics = [price, age, activity, hour]
    numerics += [rng.lognormal(0.0, 1.0, size=n) for _ in range(max(0, config.num_numeric - 4))]
    numerics = numerics[:config.num_numeric]

    z_price = (np.log(price) - _PRICE_MEDIAN_LOG) / _PRICE_SPREAD
    z_age = (age - _AGE_PEAK) / _AGE_SPREAD
    z_activity = np.nan_to_num((np.log1p(activity) - _ACTIVITY_MEAN) / _ACTIVITY_SPREAD)
    field_index = np.arange(fields.shape[1])

    def field_sum(effect):
        return effect[field_index[None, :], fields].sum(1) if fields.shape[1] else 0.0

    click_logit = (config.sequence_weight * sequence_term + catalog.user_click_bias[users]
                   + catalog.ad_click_bias[ads] + field_sum(catalog.field_click_effect)
                   - 0.35 * z_price - 0.35 * z_age ** 2 + 0.3 * z_activity
                   + 0.25 * np.cos(2 * np.pi * (hour - 20) / 24))
    interest_weight = config.click_interest_weight
    if interest_weight:  # the user's taste for the target's category that day
        affinity = (catalog.user_interest_weights[users]
                    * relation[day.user_interests[users] - 1, target_category[:, None] - 1])
        click_logit = click_logit + interest_weight * affinity.sum(1)
    in_purchase = target_category == catalog.user_purchase_category[users]
    conversion_logit = (2.0 * in_purchase + catalog.advertiser_quality[advertisers]
                        - 0.9 * z_price + 0.2 * z_activity
                        + field_sum(catalog.field_conversion_effect))
    if catalog.interaction_user is not None:  # the planted user x category interactions
        target_factors = catalog.interaction_category[target_category - 1]  # (n, r)
        scale = config.interaction_scale / math.sqrt(config.interaction_rank)
        click_logit = click_logit + scale * np.einsum(
            "nr,nr->n", catalog.interaction_user[users], target_factors)
        conversion_logit = conversion_logit + scale * np.einsum(
            "nr,nr->n", catalog.conversion_interaction_user[users], target_factors)
    in_interests = (day.user_interests[users] == target_category[:, None]).any(1)
    like_logit = (1.5 * in_interests + catalog.ad_like_quality[ads] - 0.3 * z_age
                  + field_sum(catalog.field_like_effect))

    repeated = rng.random(n) < config.repeat_rate
    extra = rng.poisson(config.mean_repeated_exposures - 2, size=n)
    exposures = np.where(repeated, np.minimum(2 + extra, config.max_exposures), 1)

    categorical = np.column_stack([users, ads, target_category, advertisers, fields])
    out = {
        "categorical": categorical.astype(np.int64),
        "numeric": np.column_stack(numerics).astype(np.float32) if numerics
        else np.zeros((n, 0), np.float32),
        "hist_ads": behaviour_ads.astype(np.int64),
        "hist_categories": behaviour_category.astype(np.int64),
        "positions": positions.astype(np.int64),
        "lengths": lengths.astype(np.int64),
        "exposure_count": exposures.astype(np.float32),
        "click_logit": click_logit, "conversion_logit": conversion_logit,
        "like_logit": like_logit,
    }
    if config.pretrained_dim:
        out["user_vec"] = catalog.user_vector[users].astype(np.float32)
        out["ad_vec"] = catalog.ad_vector[ads].astype(np.float32)
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


def _calibrate(rate_of, target: float) -> float:
    """The intercept b with rate_of(b) = target, rate_of increasing, by bisection."""
    low, high = -40.0, 40.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if rate_of(middle) < target else (low, middle)
    return 0.5 * (low + high)


# --------------------------------------------------------------------------------------------
# The schema.


def _numeric_feature(name: str, mean: float, std: float, top: float,
                     sample: np.ndarray) -> NumericFeature:
    """The feature with a quantizer fitting the generated range (``top`` the largest train
    value, ``sample`` finite train values for quantiles), mean/std from train."""
    if name == "price":  # heavy-tailed: log buckets, 4 per unit of ln(1 + x)
        return NumericFeature(name, quantizer="log", log_transform="log1p", log_scale=4.0,
                              max_code=math.floor(math.log1p(top) * 4.0), mean=mean, std=std)
    if name == "user_age":
        return NumericFeature(name, quantizer="uniform", lo=18.0, step=1.0, max_code=52,
                              mean=mean, std=std)
    if name == "user_activity":  # counts: the Criteo log transform
        code = math.floor(math.log(top) ** 2) if top > 2 else int(top)
        return NumericFeature(name, quantizer="log", log_transform="criteo", max_code=max(code, 2),
                              mean=mean, std=std)
    if name == "hour":
        return NumericFeature(name, quantizer="uniform", lo=0.0, step=1.0, max_code=23,
                              mean=mean, std=std)
    num_bins = 32
    boundaries = np.quantile(sample, np.arange(1, num_bins) / num_bins) if sample.size \
        else np.arange(1, num_bins, dtype=np.float64)
    return NumericFeature(name, quantizer="quantile", num_bins=num_bins,
                          boundaries=tuple(float(b) for b in boundaries), mean=mean, std=std)


def _make_schema(config: SyntheticConfig, catalog: _Catalog,
                 summary: _NumericSummary) -> Schema:
    low_card_names = [name for name, _ in LOW_CARD_FIELDS[:config.num_low_card_fields]]
    low_card_names += [f"field_{k}" for k in range(3, config.num_low_card_fields)]
    categorical = [
        CategoricalFeature("user_id", vocab_size=config.num_users + 1),
        CategoricalFeature("ad_id", vocab_size=config.num_ads + 1),
        CategoricalFeature("ad_category", vocab_size=config.num_categories + 1),
        CategoricalFeature("advertiser", vocab_size=config.num_advertisers + 1),
    ] + [CategoricalFeature(name, vocab_size=card + 1)
         for name, card in zip(low_card_names, catalog.field_cardinalities)]
    numeric_names = list(NUMERIC_FIELDS) + [f"noise_{k}" for k in range(4, config.num_numeric)]
    numeric = [summary.feature(f, name)
               for f, name in enumerate(numeric_names[:config.num_numeric])]
    sequence = [SequenceFeature("hist_ads", item="ad_id", max_len=config.max_len),
                SequenceFeature("hist_categories", item="ad_category", max_len=config.max_len)]
    pretrained = ([PretrainedFeature("interest_sim", user_column="user_vec", item_column="ad_vec",
                                     dim=config.pretrained_dim)] if config.pretrained_dim else [])
    labels = [Label("click"), Label("conversion"), Label("like", auxiliary=True)]
    return Schema("synthetic", categorical=tuple(categorical), numeric=tuple(numeric),
                  sequence=tuple(sequence), pretrained=tuple(pretrained), labels=tuple(labels),
                  group_id="user_id", exposure_count="exposure_count").validate()


# --------------------------------------------------------------------------------------------
# generate.


class _Generator:
    """The world of a config, produced chunk by chunk in bounded memory.

    The catalog is drawn once, then the timeline (days > 1). Rows come day by day; a day's
    rows are its train, valid and test segments, one after the other, each spread over the
    whole day in time order; they are generated in chunks of up to ``_CHUNK_ROWS`` rows. Row
    chunk i of day d has its own generator (SeedSequence child (d, i), or i in a one-day
    world: the same whatever num_rows), and the label draws come in order from one generator,
    so the rows do not depend on how they are consumed. The intercepts are calibrated on the
    first ``_CALIBRATION_ROWS / days`` rows of each day, generated once more for that (a few
    seconds at most).
    """

    def __init__(self, config: SyntheticConfig):
        self.config = config
        root = np.random.SeedSequence(config.seed)
        catalog_seed, self._rows_seed, self._labels_seed = root.spawn(3)
        self.catalog = _make_catalog(config, np.random.default_rng(catalog_seed))
        self.timeline = _make_timeline(config, self.catalog, np.random.default_rng(
            np.random.SeedSequence(config.seed, spawn_key=(3,))) if config.days > 1 else None)
        self.relation = _relation_matrix(config.num_categories)  # (C, C)
        self.decay = np.exp(-np.arange(config.max_len) / config.decay_scale)  # (P,)
        self.segments = self._segments()
        self.plan = self._plan()
        self._day: _Day | None = None
        self.intercepts = self._calibrate()

    def _segments(self) -> list[tuple[str, int, int, int]]:
        """(split, day, first row, end row) of each day's splits, in row order: day d's rows
        are one train, one valid and one test slice (fractions of that day's rows)."""
        config, segments, start = self.config, [], 0
        n, days = config.num_rows, config.days
        for day in range(days):
            rows = n // days + (day < n % days)
            num_valid, num_test = int(rows * config.valid_fraction), \
                int(rows * config.test_fraction)
            sizes = {"train": rows - num_valid - num_test, "valid": num_valid, "test": num_test}
            for name in SPLITS:
                segments.append((name, day, start, start + sizes[name]))
                start += sizes[name]
        return segments

    def _plan(self) -> list[tuple[int, int, int, int, np.random.SeedSequence]]:
        """(day, chunk of the day, first row, end row, seed) of every chunk, in row order."""
        plan, config = [], self.config
        for day in range(config.days):
            first = min(a for _, d, a, _ in self.segments if d == day)
            end = max(b for _, d, _, b in self.segments if d == day)
            starts = range(first, end, _CHUNK_ROWS)
            if config.days == 1:  # the seeds of one-day worlds made before days existed
                seeds = self._rows_seed.spawn(len(starts))
            else:
                seeds = [np.random.SeedSequence(config.seed,
                                                spawn_key=self._rows_seed.spawn_key + (day, i))
                         for i in range(len(starts))]
            for i, (start, seed) in enumerate(zip(starts, seeds)):
                plan.append((day, i, start, min(start + _CHUNK_ROWS, end), seed))
        return plan

    def _timestamps(self, day: int, chunk: int, start: int, stop: int) -> np.ndarray:
        """Seconds of rows [start, stop) of ``day``: row j of a segment of m rows at
        day · 86400 + floor((j + u_j) · 86400 / m), u_j uniform: in time order, spread over the
        day (the rows of a day are i.i.d., so handing out sorted times in row order is drawing
        times and sorting the rows by them)."""
        rng = np.random.default_rng(np.random.SeedSequence(self.config.seed,
                                                           spawn_key=(4, day, chunk)))
        jitter = rng.random(stop - start)
        rows = np.arange(start, stop)
        out = np.empty(stop - start, np.int64)
        for _, d, a, b in self.segments:
            lo, hi = max(a, start), min(b, stop)
            if d == day and lo < hi:
                j = rows[lo - start:hi - start] - a + jitter[lo - start:hi - start]
                second = np.floor(j * SECONDS_PER_DAY / (b - a)).astype(np.int64)
                out[lo - start:hi - start] = day * SECONDS_PER_DAY + np.minimum(
                    second, SECONDS_PER_DAY - 1)  # rounding may reach the next day
        return out

    def day(self, day: int) -> _Day:
        """Day ``day``'s interests and ads (the last one asked for is kept)."""
        if self._day is None or self._day.index != day:
            self._day = _make_day(self.config, self.catalog, self.timeline, day)
        return self._day

    def _raw(self, index: int) -> dict[str, np.ndarray]:
        day, chunk, start, stop, seed = self.plan[index]
        timestamps = self._timestamps(day, chunk, start, stop)
        columns = _generate_chunk(self.config, self.catalog, self.day(day), self.relation,
                                  self.decay, timestamps, np.random.default_rng(seed))
        columns["timestamp"] = timestamps
        return columns

    def _calibrate(self) -> tuple[float, float, float]:
        """Intercepts so the observed rates hit their targets (on up to 200k rows, spread over
        the days: plenty)."""
        keys = ("exposure_count", "click_logit", "conversion_logit", "like_logit")
        parts = {key: [] for key in keys}
        quota = -(-_CALIBRATION_ROWS // self.config.days)  # rows from the start of each day
        taken = {}
        for index, (day, *_) in enumerate(self.plan):
            if taken.get(day, 0) >= quota:
                continue
            chunk = self._raw(index)
            for key in keys:
                parts[key].append(chunk[key][:quota - taken.get(day, 0)])
            taken[day] = taken.get(day, 0) + len(parts[keys[0]][-1])
        sample = {key: np.concatenate(values) for key, values in parts.items()}
        exposures = sample["exposure_count"].astype(np.float64)
        b_click = _calibrate(lambda b: np.mean(
            1 - (1 - _sigmoid(sample["click_logit"] + b)) ** exposures), self.config.click_rate)
        observed_click = 1 - (1 - _sigmoid(sample["click_logit"] + b_click)) \
            ** sample["exposure_count"]
        b_conversion = _calibrate(lambda b: np.mean(
            observed_click * _sigmoid(sample["conversion_logit"] + b)),
            self.config.conversion_rate)
        b_like = _calibrate(lambda b: np.mean(_sigmoid(sample["like_logit"] + b)),
                            self.config.like_rate)
        return b_click, b_conversion, b_like

    def chunks(self):
        """(first row, layout columns) of every chunk, in row order (labels, truths and, with
        days > 1, timestamps included)."""
        b_click, b_conversion, b_like = self.intercepts
        labels_rng = np.random.default_rng(self._labels_seed)
        for index, (_, _, start, _, _) in enumerate(self.plan):
            columns = self._raw(index)
            n = len(columns["exposure_count"])
            p_click = _sigmoid(columns["click_logit"] + b_click)  # (n,) per exposure
            observed_click = 1 - (1 - p_click) ** columns["exposure_count"]  # (n,)
            p_conversion_given_click = _sigmoid(columns["conversion_logit"] + b_conversion)
            p_like = _sigmoid(columns["like_logit"] + b_like)
            uniform = labels_rng.random((n, 3))  # (n, T): consecutive draws, chunk after chunk
            click = uniform[:, 0] < observed_click
            conversion = click & (uniform[:, 1] < p_conversion_given_click)
            like = uniform[:, 2] < p_like
            labels = np.column_stack([click, conversion, like]).astype(np.float32)  # (n, T)
            layout = {
                "categorical": columns["categorical"],
                "numeric": columns["numeric"],
                "seq/hist_ads": columns["hist_ads"],
                "seq/hist_ads/lengths": columns["lengths"],
                "seq/hist_ads/positions": columns["positions"],
                "seq/hist_categories": columns["hist_categories"],
                "seq/hist_categories/lengths": columns["lengths"],
                "seq/hist_categories/positions": columns["positions"],
            }
            if self.config.pretrained_dim:
                layout["pretrained/interest_sim/user"] = columns["user_vec"]
                layout["pretrained/interest_sim/item"] = columns["ad_vec"]
            layout.update({
                "labels": labels,
                "group_id": np.ascontiguousarray(columns["categorical"][:, 0]),
                "exposure_count": columns["exposure_count"],
                "true/click": p_click.astype(np.float32),
                "true/conversion": (p_click * p_conversion_given_click).astype(np.float32),
                "true/like": p_like.astype(np.float32),
            })
            if self.config.days > 1:
                layout["timestamp"] = columns["timestamp"]
            yield start, layout

    def split_chunks(self):
        """(split, columns) pieces in row order: each chunk cut at the segment boundaries."""
        for start, layout in self.chunks():
            stop = start + len(layout["labels"])
            for name, _, a, b in self.segments:
                lo, hi = max(a, start), min(b, stop)
                if lo < hi:
                    yield name, {key: values[lo - start:hi - start]
                                 for key, values in layout.items()}

    def ground_truth(self) -> GroundTruth:
        catalog, (b_click, b_conversion, b_like) = self.catalog, self.intercepts
        timeline = self.timeline
        return GroundTruth(
            relation=self.relation, decay=self.decay,
            sequence_weight=float(self.config.sequence_weight),
            ad_category=catalog.ad_category, ad_advertiser=catalog.ad_advertiser,
            advertiser_category=catalog.advertiser_category,
            user_interests=catalog.user_interests,
            user_interest_weights=catalog.user_interest_weights,
            user_purchase_category=catalog.user_purchase_category,
            field_click_effect=catalog.field_click_effect,
            field_conversion_effect=catalog.field_conversion_effect,
            field_like_effect=catalog.field_like_effect, click_intercept=b_click,
            conversion_intercept=b_conversion, like_intercept=b_like,
            days=self.config.days, interest_weight=self.config.click_interest_weight,
            ad_birth_day=timeline.ad_birth_day, ad_last_day=timeline.ad_last_day,
            user_interest_shift=timeline.user_interest_shift,
            user_interests_by_day=timeline.user_interests,
            **({} if catalog.interaction_user is None else {
                "interaction_user": catalog.interaction_user,
                "interaction_category": catalog.interaction_category,
                "conversion_interaction_user": catalog.conversion_interaction_user,
                "interaction_scale": float(self.config.interaction_scale)}))


class _NumericSummary:
    """What the schema's numeric features need of the train split, seen chunk by chunk: float64
    sums for mean and std, the maximum, and the first ``_CALIBRATION_ROWS`` values for quantiles."""

    def __init__(self, num_numeric: int):
        self.count = np.zeros(num_numeric)
        self.total = np.zeros(num_numeric)
        self.squares = np.zeros(num_numeric)
        self.top = np.full(num_numeric, -np.inf)
        self.sample: list[np.ndarray] = []
        self._sampled = 0

    def update(self, numeric: np.ndarray) -> None:
        values = numeric.astype(np.float64)
        finite = np.isfinite(values)
        clean = np.where(finite, values, 0.0)
        self.count += finite.sum(0)
        self.total += clean.sum(0)
        self.squares += (clean ** 2).sum(0)
        self.top = np.maximum(self.top, np.where(finite, values, -np.inf).max(0, initial=-np.inf))
        if self._sampled < _CALIBRATION_ROWS:
            self.sample.append(values[:_CALIBRATION_ROWS - self._sampled])
            self._sampled += len(self.sample[-1])

    def feature(self, f: int, name: str) -> NumericFeature:
        count = self.count[f]
        mean = float(self.total[f] / count) if count else 0.0
        variance = float(self.squares[f] / count - mean ** 2) if count else 0.0
        std = math.sqrt(variance) if variance > 0 else 1.0
        top = float(self.top[f]) if count else 1.0
        sample = np.concatenate(self.sample)[:, f] if self.sample else np.zeros(0)
        return _numeric_feature(name, mean, std, top, sample[np.isfinite(sample)])


def generate(config: SyntheticConfig | None = None) -> SyntheticWorld:
    """Generates the world of ``config`` (default: SyntheticConfig()) in memory; deterministic
    given it. For worlds larger than memory, :func:`write_world`."""
    config = config or SyntheticConfig()
    generator = _Generator(config)
    parts: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in SPLITS}
    summary = _NumericSummary(config.num_numeric)
    for name, columns in generator.split_chunks():
        parts[name].append(columns)
        if name == "train":
            summary.update(columns["numeric"])
    splits = {name: {key: np.concatenate([c[key] for c in chunks])
                     for key in chunks[0]} if chunks else _empty_split(generator)
              for name, chunks in parts.items()}
    schema = _make_schema(config, generator.catalog, summary)
    return SyntheticWorld(config, schema, splits, generator.ground_truth())


def _empty_split(generator: _Generator) -> dict[str, np.ndarray]:
    _, first = next(generator.chunks())
    return {key: values[:0] for key, values in first.items()}


def write_world(config: SyntheticConfig, directory: str | Path, *, progress: bool = False,
                row_group_rows: int | None = None) -> Path:
    """Generates the world of ``config`` straight into ``directory`` (the files of
    :meth:`SyntheticWorld.save`), one chunk of rows at a time, day after day: memory stays
    bounded by a chunk and a row group whatever ``num_rows`` and ``days``, and each split's rows
    (and row groups) come in time order. The same config gives the same rows as
    :func:`generate`; the schema's quantile boundaries (noise features only) come from the
    first 200k train rows. Each file appears under its name only when complete; row groups
    hold ``row_group_rows`` rows (default :data:`hmoe.data.store.ROW_GROUP_ROWS`)."""
    import pyarrow.parquet as pq

    from hmoe.data.store import ROW_GROUP_ROWS

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = _Generator(config)
    summary = _NumericSummary(config.num_numeric)
    writers, temporaries, schema = {}, {}, None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=config.num_rows, unit="row", unit_scale=True, desc="generate")
    try:
        for name, columns in generator.split_chunks():
            if name == "train":
                summary.update(columns["numeric"])
            if schema is None:  # the table layout only needs names and dims, not statistics
                schema = _make_schema(config, generator.catalog, summary)
            table = _columns_to_table(columns, schema)
            if name not in writers:
                temporaries[name] = directory / f".{name}.parquet.tmp"
                writers[name] = pq.ParquetWriter(temporaries[name], table.schema)
            writers[name].write_table(table, row_group_size=row_group_rows or ROW_GROUP_ROWS)
            if bar is not None:
                bar.update(table.num_rows)
    finally:
        for writer in writers.values():
            writer.close()
        if bar is not None:
            bar.close()
    for name, temporary in temporaries.items():
        temporary.replace(directory / f"{name}.parquet")
    schema = _make_schema(config, generator.catalog, summary)
    _write_world_meta(directory, config, schema, generator.ground_truth())
    return directory


def _write_world_meta(directory: Path, config: SyntheticConfig, schema: Schema,
                      ground_truth: GroundTruth) -> None:
    import yaml

    (directory / "schema.yaml").write_text(dump_schema(schema), encoding="utf-8")
    (directory / "config.yaml").write_text(
        yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")
    ground_truth.save(directory / "ground_truth.npz")


# --------------------------------------------------------------------------------------------
# Parquet.


def _columns_to_table(columns: dict[str, np.ndarray], schema: Schema):
    """One split's layout columns -> a pyarrow Table with one column per feature."""
    import pyarrow as pa

    table: dict[str, pa.Array] = {}
    for f, feature in enumerate(schema.categorical):
        table[feature.column or feature.name] = pa.array(columns["categorical"][:, f])
    for f, feature in enumerate(schema.numeric):
        # pa.array keeps NaN as a float value (not null) for numpy input: missing stays NaN.
        table[feature.column or feature.name] = pa.array(columns["numeric"][:, f])
    for seq in schema.sequence:
        ids, lengths = columns[f"seq/{seq.name}"], columns[f"seq/{seq.name}/lengths"]
        valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]  # (N, L)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        list_type = pa.ListArray if offsets[-1] < 2**31 else pa.LargeListArray  # int32 offsets
        table[seq.column or seq.name] = list_type.from_arrays(offsets, ids[valid])
    for pre in schema.pretrained:
        for side, column in (("user", pre.user_column), ("item", pre.item_column)):
            vectors = columns[f"pretrained/{pre.name}/{side}"]
            table[column] = pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), pre.dim)
    for t, label in enumerate(schema.labels):
        table[label.column or label.name] = pa.array(columns["labels"][:, t])
    if schema.exposure_count is not None:
        table[schema.exposure_count] = pa.array(columns["exposure_count"])
    for key, values in columns.items():
        if key.startswith("true/"):
            table[key] = pa.array(values)
    if "timestamp" in columns:
        table["timestamp"] = pa.array(columns["timestamp"], pa.int64())
    return pa.table(table)


def _table_to_columns(rows, schema: Schema) -> dict[str, np.ndarray]:
    """Inverse of :func:`_columns_to_table`: rows picked from a world file
    (:class:`hmoe.data.store.Picked`) -> batch-layout columns."""
    def column(name):
        return rows.column(name)

    out: dict[str, np.ndarray] = {}
    if schema.categorical:
        out["categorical"] = rows.stack([f.column or f.name for f in schema.categorical],
                                        np.int64)
    if schema.numeric:
        out["numeric"] = rows.stack([f.column or f.name for f in schema.numeric], np.float32)
    for seq in schema.sequence:
        ids, lengths = rows.lists(seq.column or seq.name, seq.max_len)
        out[f"seq/{seq.name}"] = ids
        out[f"seq/{seq.name}/lengths"] = lengths
        positions = np.subtract.outer(lengths, np.arange(seq.max_len))  # (N, L) rank = len - i
        out[f"seq/{seq.name}/positions"] = np.maximum(positions, 0, out=positions)
    for pre in schema.pretrained:
        for side, name in (("user", pre.user_column), ("item", pre.item_column)):
            out[f"pretrained/{pre.name}/{side}"] = column(name).astype(np.float32, copy=False)
    out["labels"] = rows.stack([label.column or label.name for label in schema.labels],
                               np.float32)
    if schema.group_id is not None:
        out["group_id"] = column(schema.group_id).astype(np.int64)
    if schema.exposure_count is not None:
        out["exposure_count"] = column(schema.exposure_count).astype(np.float32)
    for name in rows.names:
        if name.startswith("true/"):
            out[name] = column(name).astype(np.float32)
    if "timestamp" in rows.names:  # worlds saved before days existed lack it
        out["timestamp"] = column("timestamp").astype(np.int64)
    return out
