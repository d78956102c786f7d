"""The pieces of the learned-against-fixed study: scenes, oracle maps, weight statistics, intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tdfusion import study
from tdfusion.catalog import load_scenes
from tdfusion.cli import build_parser
from tdfusion.commands.demo import _probe_pairs, scoring_seed
from tdfusion.commands.train import build_trainer, train
from tdfusion.data import Scene
from tdfusion.study import FIXED_MAPS, paired_interval, weights_at
from tdfusion.synthetic import COLD_LOOKALIKE, HOT_SEAM, SEG_CLASSES, make_scene, make_scenes, oracle_weights
from tdfusion.tasks import build_task, median_frequency_weights

from metaloss import ConstantWeights, GlobalWeights
from metaloss.fusion import tdfusion_loss


def test_oracle_weights_follow_the_labels() -> None:
    mask = np.array([[0, 1, 2, 3]])
    w = oracle_weights(mask)
    np.testing.assert_array_equal(w[0], [[0.5, 1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(w.sum(0), np.ones((1, 4)))


@pytest.mark.parametrize(
    ("marking", "expected"), [("visible", 0.0), ("infrared", 1.0), ("half", 0.5), ("brighter", [1.0, 0.0])]
)
def test_oracle_weights_marking_choices_change_the_markings_only(marking: str, expected: object) -> None:
    """``oracle_hiding`` keeps its targets and background whatever the markings get."""
    mask = np.array([[0, 0, 1, 3, 3]])
    a = np.array([[10.0, 90.0, 220.0, 90.0, 90.0]], np.float32)  # infrared: road, target, road under paint
    b = np.array([[50.0, 30.0, 40.0, 56.0, 225.0]], np.float32)  # visible: dim paint (night), bright paint (day)
    w = oracle_weights(mask, a, b, marking=marking)
    np.testing.assert_array_equal(w[0, 0, :3], [1.0, 0.0, 1.0])  # the darker source, infrared on the target
    np.testing.assert_array_equal(w[0, 0, 3:], np.broadcast_to(np.asarray(expected, np.float32), (2,)))
    np.testing.assert_array_equal(w.sum(0), np.ones((1, 5)))


def test_oracle_weights_reject_an_unknown_marking_choice() -> None:
    with pytest.raises(ValueError, match="marking='paint'"):
        oracle_weights(np.zeros((1, 2), np.int64), marking="paint")
    with pytest.raises(ValueError, match="needs the sources"):
        oracle_weights(np.zeros((1, 2), np.int64), marking="brighter")


def test_look_alikes_are_what_averaging_cannot_tell_apart() -> None:
    """In (A + B) / 2 targets and cold look-alikes stand out from the road alike; in A they do not."""
    plain_a, decoy_a = [], []
    for i in range(0, 24, 2):  # daylight scenes
        plain, decoyed = make_scene(i, decoys=False), make_scene(i)
        np.testing.assert_array_equal(plain.mask, make_scene(i, decoys=False).mask)  # deterministic
        road = (plain.mask == 0) & (np.arange(plain.a.shape[0])[:, None] > plain.a.shape[0] * 0.5)
        added: np.ndarray = road & (decoyed.mask == 0) & (np.abs(decoyed.b - plain.b) > 60)  # cold look-alikes
        target = np.logical_or(decoyed.mask == 1, decoyed.mask == 2)
        if added.sum() < 20 or target.sum() < 20:
            continue
        avg = (decoyed.a + decoyed.b) / 2
        base = avg[road & ~added].mean()
        plain_a.append((avg[target].mean() - base, avg[added].mean() - base))
        ir_base = decoyed.a[road & ~added].mean()
        decoy_a.append((decoyed.a[target].mean() - ir_base, decoyed.a[added].mean() - ir_base))
    assert len(plain_a) >= 3
    for target_contrast, decoy_contrast in plain_a:  # similar contrast in the average
        assert target_contrast > 30 and decoy_contrast > 30 and abs(target_contrast - decoy_contrast) < 35
    for target_contrast, decoy_contrast in decoy_a:  # infrared shows the targets only
        assert target_contrast > 80 and abs(decoy_contrast) < 0.25 * target_contrast


def test_weights_at_reads_a_constant_loss_as_one_half() -> None:
    scenes = make_scenes(4, size=(48, 64))
    w = weights_at(tdfusion_loss(ConstantWeights(2)), scenes)
    assert w["target_infrared"] == pytest.approx(0.5) and w["marking_visible"] == pytest.approx(0.5)
    assert w["background_infrared"] == pytest.approx(0.5)
    assert set(w) >= {"target_infrared_day", "target_infrared_night", "marking_visible_day", "marking_visible_night"}
    for name, fn in FIXED_MAPS.items():
        assert fn(scenes[0]).shape == (2, 48, 64), name


def test_weights_at_reads_the_brighter_source_at_markings() -> None:
    """With w_infrared = 0.8 everywhere, the brighter source at a marking gets 0.2 by day (the
    visible paint is brighter) and 0.8 at night (the infrared road is brighter than the dimmed paint)."""
    generator = GlobalWeights(2)
    with torch.no_grad():
        generator.logits.copy_(torch.tensor([np.log(0.8), np.log(0.2)]))
    w = weights_at(tdfusion_loss(generator, weights="softmax"), make_scenes(4, size=(48, 64)))
    assert w["target_infrared"] == pytest.approx(0.8, abs=1e-5)
    assert w["marking_visible"] == pytest.approx(0.2, abs=1e-5)
    assert w["marking_brighter_day"] == pytest.approx(0.2, abs=0.02)
    assert w["marking_brighter_night"] == pytest.approx(0.8, abs=0.02)
    assert w["marking_surround_visible"] == pytest.approx(0.2, abs=1e-5)
    assert w["cold_lookalike_visible_day"] == pytest.approx(0.2, abs=1e-5)
    assert w["hot_seam_infrared_night"] == pytest.approx(0.8, abs=1e-5)


def test_the_generator_records_its_look_alikes() -> None:
    """``Scene.lookalikes`` marks background pixels that one camera shows brighter than the road:
    visible light on a cold look-alike, infrared on a hot seam (by day as bright as the markings)."""
    counts = np.zeros(3, int)
    for i in range(0, 16, 2):  # daylight scenes
        scene = make_scene(i, size=(96, 128))
        where, mask = scene.lookalikes, scene.label_mask()
        assert where is not None and where.shape == mask.shape and where.dtype == np.uint8
        assert not where[mask != 0].any()  # labelled pixels stay as they are
        road = (mask == 0) & (where == 0) & (np.arange(96)[:, None] > 60)
        cold, seam = where == COLD_LOOKALIKE, where == HOT_SEAM
        counts += [cold.sum(), seam.sum(), road.sum()]
        if cold.sum() >= 20:
            assert (scene.b - scene.a)[cold].mean() > (scene.b - scene.a)[road].mean() + 80
        if seam.sum() >= 20:
            assert scene.a[seam].mean() > scene.a[road].mean() + 80
    assert counts.min() > 200
    assert not make_scene(0, decoys=False).lookalikes.any()  # type: ignore[union-attr]


def test_the_cold_look_alikes_map_changes_daylight_look_alikes_only() -> None:
    day, night = make_scene(0), make_scene(1)
    for scene in (day, night):
        changed = FIXED_MAPS["oracle_hiding_cold_lookalikes_visible"](scene)
        hiding = FIXED_MAPS["oracle_hiding"](scene)
        cold = np.asarray(scene.lookalikes == COLD_LOOKALIKE)
        assert cold.sum() > 20
        np.testing.assert_array_equal(changed[:, ~cold], hiding[:, ~cold])
        if scene is day:  # visible light where oracle_hiding put the darker source, infrared
            assert (hiding[0][cold] == 1).all() and (changed[1][cold] == 1).all()
        else:
            np.testing.assert_array_equal(changed, hiding)


def test_weights_at_without_recorded_look_alikes_gives_nan_there() -> None:
    """Scenes read from disk (``lookalikes=None``) have no look-alike regions to average."""
    scenes = [Scene(s.name, s.a, s.b, s.mask) for s in make_scenes(2, size=(48, 64))]
    w = weights_at(tdfusion_loss(ConstantWeights(2)), scenes)
    assert np.isnan(w["cold_lookalike_visible"]) and np.isnan(w["hot_seam_infrared_day"])
    assert w["marking_visible"] == pytest.approx(0.5)


def test_the_marking_surround_is_the_background_beside_a_marking() -> None:
    mask = np.zeros((9, 12), np.int64)
    mask[4, 5] = 3
    mask[4, 7] = 1  # a target pixel beside the marking is not road
    surround = study._marking_surround(mask)
    expected = np.zeros_like(surround)
    expected[1:8, 2:9] = True
    expected[4, 5] = expected[4, 7] = False
    np.testing.assert_array_equal(surround, expected)


def test_paired_interval_is_the_student_t_interval() -> None:
    mean, low, high = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and low == pytest.approx(3.0 - 2.776445 * np.sqrt(2.5) / np.sqrt(5), rel=1e-5)
    assert high == pytest.approx(6.0 - low)
    assert np.isnan(paired_interval([1.0])[1])


def test_median_frequency_weights() -> None:
    masks = [np.array([[0, 0, 0, 1], [0, 0, 1, 2]])]  # frequencies 5/8, 2/8, 1/8; class 3 absent
    w = median_frequency_weights(masks, 4)
    torch.testing.assert_close(w, torch.tensor([0.4, 1.0, 2.0, 0.0]))
    gentle = median_frequency_weights(masks, 4, power=0.5)  # --class-weight-power 0.5
    torch.testing.assert_close(gentle, torch.tensor([0.4**0.5, 1.0, 2.0**0.5, 0.0]))


def test_the_probe_does_not_change_the_training_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """OracleProbe runs the task network in train mode (dropout): it must restore the RNG."""

    def fit(probe: bool) -> dict[str, torch.Tensor]:
        args = build_parser().parse_args(
            ["demo", "--epochs", "2", "--warmup-epochs", "0", "--meta-iterations", "1", "--meta-accumulation", "1"]
            + ["--synthetic-train", "4", "--crop", "32", "--quiet", "--out", str(tmp_path / str(probe))]
        )
        scenes = load_scenes(args, "train", "seg")
        callbacks = [study.OracleProbe(_probe_pairs(args, scenes), [scenes[0], scenes[1]])] if probe else []
        trainer = train(args, callbacks)
        if probe:
            assert len(callbacks[0].rows) == 2 and -1 <= callbacks[0].rows[0]["cos_to_oracle"] <= 1
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    plain, probed = fit(False), fit(True)
    assert all(torch.equal(plain[k], probed[k]) for k in plain)


@pytest.mark.parametrize("virtual_step", ["model", "output"])
def test_oracle_agreement_reads_the_probe_direction(tmp_path, virtual_step: str) -> None:  # type: ignore[no-untyped-def]
    """One pair: oracle_agreement's cosine is OracleProbe's, and its shares follow the descent's signs
    (on the crop, or on the task view where --virtual-step output takes its map gradient)."""
    args = build_parser().parse_args(
        ["demo", "--synthetic-train", "4", "--crop", "32", "--quiet", "--out", str(tmp_path)]
        + ["--virtual-step", virtual_step]
    )
    scenes = load_scenes(args, "train", "seg")
    trainer = build_trainer(args)
    pair = next(  # a meta-train batch with targets and markings
        (tr, te) for tr, te in _probe_pairs(args, scenes) if {1, 3} <= set(tr["crop_mask"].unique().tolist())
    )
    rng = torch.get_rng_state()
    agreement = study.oracle_agreement(trainer.meta_step, *pair)
    torch.set_rng_state(rng)  # the same dropout draws for the probe's pass
    probe = study.OracleProbe([pair], [scenes[0]])
    assert agreement["cos_to_oracle"] == pytest.approx(probe._cosines(trainer)["cos_to_oracle"], rel=1e-5)
    torch.set_rng_state(rng)
    toward, descent = study.map_directions(trainer.meta_step, *pair)
    masks = pair[0]["crop_mask" if virtual_step == "model" else "mask"]
    assert toward.shape == descent.shape == masks.shape
    targets = (masks == 1) | (masks == 2)
    assert bool(targets.any()) and bool((toward[targets] > 0).all()) and bool((toward[masks == 3] < 0).all())
    expected = float(descent[targets].sum() / descent[targets].abs().sum())
    assert agreement["target_share"] == pytest.approx(expected, rel=1e-5)
    night = torch.tensor([name.endswith("N") for name in pair[0]["name"]]).view(-1, 1, 1)
    near = torch.nn.functional.max_pool2d((masks == 3).float()[:, None], 7, stride=1, padding=3)[:, 0] > 0
    beside = near & (masks == 0)  # the road within 3 pixels (a 7 x 7 square) of a marking
    assert bool(beside.any())
    where = pair[0]["crop_lookalikes" if virtual_step == "model" else "lookalikes"]
    assert where.shape == masks.shape and not bool(where[masks != 0].any())  # the same view as the labels
    regions = {"marking": masks == 3, "surround": beside, "background": (masks == 0) & ~beside}
    regions |= {"cold_lookalike": where == COLD_LOOKALIKE, "hot_seam": where == HOT_SEAM}
    for region, pixels_of in regions.items():
        for when, scenes_of in (("day", ~night), ("night", night)):
            pixels, key = pixels_of & scenes_of, f"{region}_share_{when}"
            if bool(pixels.any()):  # toward visible light: the descent's negative part on w_a - w_b
                share = float(-descent[pixels].sum() / descent[pixels].abs().sum())
                assert agreement[key] == pytest.approx(share, rel=1e-5)
            else:
                assert np.isnan(agreement[key])


def test_compile_generator_compiles_g_in_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--compile-generator compiles the trainer's G in place (tests/test_meta_step.py runs a
    compiled generator through a meta step); its parameters keep their names for checkpoints."""
    base = ["demo", "--synthetic-train", "4", "--crop", "32", "--quiet", "--out", str(tmp_path)]
    plain = build_trainer(build_parser().parse_args(base))
    compiled = build_trainer(build_parser().parse_args([*base, "--compile-generator"]))
    assert plain.loss.generator._compiled_call_impl is None
    assert compiled.loss.generator._compiled_call_impl is not None
    assert list(compiled.loss.state_dict()) == list(plain.loss.state_dict())


def test_checkpoint_blocks_reaches_f_and_g(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--checkpoint-blocks switches on ReFusion's and G's block checkpointing
    (tests/test_activation_checkpointing.py checks its meta-gradient); off by default."""
    base = ["demo", "--synthetic-train", "4", "--crop", "32", "--quiet", "--out", str(tmp_path)]
    for options, on in (([], False), (["--checkpoint-blocks"], True)):
        trainer = build_trainer(build_parser().parse_args([*base, *options]))
        assert trainer.model.checkpoint_blocks is on
        assert trainer.loss.generator.checkpoint_blocks is on


@pytest.mark.parametrize(("virtual_step", "labels"), [("output", "mask"), ("model", "crop_mask")])
def test_balanced_map_gradient_weighs_each_pixel_by_its_class(tmp_path, virtual_step: str, labels: str) -> None:  # type: ignore[no-untyped-def]
    """--balanced-map-gradient: the meta step's map-gradient weights are each pixel's median
    frequency weight, read from the labels of the map's own view (the task view for the output
    step, the crop for the paper's)."""
    base = ["demo", "--synthetic-train", "4", "--crop", "32", "--quiet", "--out", str(tmp_path)]
    base += ["--virtual-step", virtual_step]
    assert build_trainer(build_parser().parse_args(base)).meta_step.map_gradient_weights is None
    args = build_parser().parse_args([*base, "--balanced-map-gradient"])
    scenes = load_scenes(args, "train", "seg")
    trainer = build_trainer(args)
    batch = next(iter(trainer._loader([0, 1])))
    weigh = trainer.meta_step.map_gradient_weights
    assert weigh is not None
    weights = weigh(batch)
    expected = median_frequency_weights([s.label_mask() for s in scenes], 4)
    assert weights.shape == (2, 1, *batch[labels].shape[1:])
    torch.testing.assert_close(weights[:, 0], expected[batch[labels]])
    assert float(expected[3]) > 1 > float(expected[0])  # markings weigh more than the background
    unlabelled = {**batch, labels: torch.tensor([[[255, -100, 3]]]).expand(2, 1, 3)}  # outside the classes: 0
    torch.testing.assert_close(weigh(unlabelled)[:, 0, 0], torch.tensor([0.0, 0.0, float(expected[3])]).expand(2, 3))
    gentle = build_trainer(build_parser().parse_args([*base, "--balanced-map-gradient", "--class-weight-power", "0.5"]))
    assert gentle.meta_step.map_gradient_weights is not None
    torch.testing.assert_close(gentle.meta_step.map_gradient_weights(batch)[:, 0], expected[batch[labels]].sqrt())


def test_class_weight_options_that_would_do_nothing_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--class-weight-power without a balanced option, or a balanced option with a detector,
    would change nothing; each is refused with the options named."""
    base = ["train", "--synthetic-train", "4", "--crop", "32", "--quiet", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--class-weight-power shapes"):
        build_trainer(build_parser().parse_args([*base, "--class-weight-power", "0.5"]))
    with pytest.raises(SystemExit, match="--balanced-map-gradient weigh segmentation classes; --task-net yolov8"):
        build_trainer(build_parser().parse_args([*base, "--balanced-map-gradient", "--task-net", "yolov8"]))
    trainer = build_trainer(build_parser().parse_args([*base, "--balanced-task-loss", "--class-weight-power", "0.5"]))
    assert trainer.task_loss.class_weights is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize(("offset", "shared"), [(None, False), ("0", True)])
def test_the_demo_scores_with_a_network_the_learned_loss_never_trained_against(
    tmp_path: Path, offset: str | None, shared: bool
) -> None:
    """By default an arm's scoring network does not start from the weights of the training run's
    task network (section 16); ``--task-seed-offset 0`` makes it, as before."""
    options = ["demo", "--seed", "7", "--synthetic-train", "2", "--out", str(tmp_path), "--quiet"]
    args = build_parser().parse_args(options + (["--task-seed-offset", offset] if offset else []))
    trainer = build_trainer(args)
    torch.manual_seed(scoring_seed(args))  # as downstream_miou builds the arm's first scoring network
    scoring = build_task(args.task_net, len(SEG_CLASSES)).model.state_dict()
    trained_against = trainer.task_model.state_dict()
    assert scoring.keys() == trained_against.keys()
    assert all(torch.equal(scoring[k], trained_against[k]) for k in scoring) == shared
