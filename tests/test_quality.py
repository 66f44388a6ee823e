"""``runtime quality``: metrics from a results file, the Markdown report, argument errors."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reports.quality import VARIANTS, findings_from, main, render_markdown, variant_metrics


def numbers(text: str) -> list[float]:
    """The three-decimal numbers a finding states, in order."""
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d{3}", text)]


def _results(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_variant_metrics_by_question_type_and_heatmap(tmp_path):
    rows = [
        {"question_type": "color", "accuracy.accuracy": 1.0, "q.pointing_game": 1.0, "q.energy_in_mask": 0.5,
         "q.topk_recall": 0.25, "status": "ok"},
        {"question_type": "color", "accuracy.accuracy": 0.0, "q.pointing_game": 0.0, "q.energy_in_mask": 0.1,
         "q.topk_recall": 0.75, "status": "ok"},
        {"question_type": "exists", "accuracy.accuracy": 0.6, "q.pointing_game": None, "q.energy_in_mask": None,
         "q.topk_recall": None, "status": "ok"},
        {"question_type": "count", "accuracy.accuracy": None, "q.pointing_game": None, "q.energy_in_mask": None,
         "q.topk_recall": None, "status": "error"},
    ]
    m = variant_metrics(_results(tmp_path / "r.parquet", rows), "q")
    assert m["questions"] == 4 and m["errors"] == 1
    assert m["vqa_accuracy"] == pytest.approx(1.6 / 3)
    assert m["accuracy_color"] == 0.5 and m["accuracy_exists"] == 0.6 and m["accuracy_count"] is None
    assert m["questions_color"] == 2 and m["questions_count"] == 0  # failed rows are not counted
    assert m["pointing_game"] == 0.5 and m["energy_in_mask"] == pytest.approx(0.3) and m["topk_recall"] == 0.5


def test_report_states_gains_against_the_baselines():
    base = {f"accuracy_{t}": 0.9 for t in ("color", "shape", "count", "exists")}
    base.update(accuracy_position=0.2, questions=10, errors=0, pointing_game=0.8, energy_in_mask=0.5,
                topk_recall=0.6, **{f"questions_{t}": 2 for t in ("color", "shape", "count", "position", "exists")})
    table = {"pnp_vqa": {**base, "vqa_accuracy": 0.7}, "uniform_sampling": {**base, "vqa_accuracy": 0.72},
             "gt_mask_heatmap": {**base, "vqa_accuracy": 0.8}}
    findings = findings_from(table)
    # the numbers each finding states (its wording may change): accuracy, vs uniform, vs the upper bound
    assert numbers(findings[0]) == [0.7, -0.02, -0.1] and "no gain" in findings[0]
    assert any("position" in f for f in findings)  # below 0.5 everywhere

    # against the graph a variant changes, and the types where no heatmap beats uniform sampling
    table["esam_enhanced"] = {**base, "vqa_accuracy": 0.69, "accuracy_count": 0.95}
    table["uniform_sampling"]["accuracy_count"] = 0.93
    table["uniform_sampling"]["accuracy_color"] = 0.95
    findings = findings_from(table)
    esam = next(f for f in findings if f.startswith("`esam_enhanced`"))
    assert numbers(esam) == [0.69, -0.03, -0.11, -0.01] and "`pnp_vqa`" in esam  # vs the graph it changes
    color = next(f for f in findings if f.startswith("`color` questions"))
    assert numbers(color) == [0.95, 0.9] and "`pnp_vqa`" in color  # uniform beats the best heatmap variant
    assert not any(f.startswith("`count` questions") for f in findings)  # esam_enhanced 0.95 > 0.93
    noise = next(f for f in findings if "standard error" in f)
    assert numbers(noise)[-2:] == [0.145, 0.29]  # sqrt(0.7 * 0.3 / 10) and twice it
    text = render_markdown(table, {"itm_accuracy": 0.9, "swap_accuracy": 0.95, "pointing_game": 0.8}, seed=9000,
                           images=3, command="runtime quality --images 3", findings=findings)
    assert "| `pnp_vqa` | 0.700 | 0.900 | 0.900 | 0.900 | 0.200 | 0.900 | 0.800 | 0.500 | 0.600 |" in text
    assert "runtime quality --images 3" in text and "**0.900**" in text


def test_unknown_variant_is_refused(capsys):
    assert main(["--only", "nope"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert {v.name for v in VARIANTS.values()} >= {"pnp_vqa", "esam_enhanced", "fusion_caption", "fusion_gradcam", "qavit",
                                         "uniform_sampling", "gt_mask_heatmap"}


def test_metrics_and_findings_by_background(tmp_path):
    from reports.quality import sample_backgrounds

    rows = [{"sample_id": f"s{i}", "question_type": "color", "accuracy.accuracy": acc, "q.pointing_game": hit,
             "q.energy_in_mask": 0.5, "q.topk_recall": 0.5, "status": "ok"}
            for i, (acc, hit) in enumerate([(1.0, 1.0), (1.0, 1.0), (0.0, 0.0), (1.0, None)])]
    backgrounds = {"s0": "plain", "s1": "plain", "s2": "checker", "s3": "checker"}
    m = variant_metrics(_results(tmp_path / "r.parquet", rows), "q", backgrounds)
    assert m["by_background"]["plain"] == {"questions": 2, "vqa_accuracy": 1.0, "pointing_game": 1.0}
    assert m["by_background"]["checker"] == {"questions": 2, "vqa_accuracy": 0.5, "pointing_game": 0.0}
    assert m["by_background"]["noise"] == {"questions": 0, "vqa_accuracy": None, "pointing_game": None}
    findings = findings_from({"pnp_vqa": m})
    assert "`pnp_vqa`'s heatmap finds the referred object less often on textured backgrounds: pointing game " \
           "1.000 on plain, 0.000 on checker." in findings
    text = render_markdown({"pnp_vqa": m}, {}, seed=1, images=2, command="c", findings=findings)
    assert "| variant | plain (2) | checker (2) |" in text and "| `pnp_vqa` | 1.000 / 1.000 | 0.500 / 0.000 |" in text

    real = sample_backgrounds(9000, 3)  # the source's own scenes
    assert len(real) >= 6 and set(real.values()) <= {"plain", "noise", "stripes", "checker"}
    assert all(k.startswith("shapes-9000-") for k in real)


def _faith_row(deletion, insertion, road, pointing, energy, recall, level=0.5):
    return {"deletion_auc": deletion, "insertion_auc": insertion, "road_auc": road,
            "random_deletion_auc": level, "random_insertion_auc": level, "random_road_auc": level,
            "centre_deletion_auc": 0.4, "centre_insertion_auc": 0.6, "centre_road_auc": 0.45,
            "pointing_game": pointing, "energy_in_mask": energy, "topk_recall": recall}


def test_faithfulness_section_means_and_rank_agreement_with_the_masks():
    from reports.quality_faithfulness import faithfulness_table, render_section

    rows = {
        # deletion falls as energy rises (-deletion agrees: rho 1); insertion the reverse (rho -1)
        "a": [_faith_row(0.4, 0.8, 0.3, 1.0, 0.6, 0.5), _faith_row(0.2, 0.9, 0.1, 1.0, 0.9, 0.5),
              _faith_row(0.6, 0.7, 0.5, 0.0, 0.1, None)],
        "b": [_faith_row(0.5, 0.5, 0.5, 0.0, 0.2, 0.1), _faith_row(0.7, 0.6, 0.4, 0.0, 0.0, 0.2),
              _faith_row(0.3, 0.4, 0.6, 1.0, 0.4, 0.3)],
        "c": [_faith_row(0.9, 0.2, 0.8, 0.0, 0.05, None), _faith_row(0.8, 0.3, 0.7, None, None, None),
              _faith_row(0.7, 0.1, 0.9, 0.0, 0.05, None)],
    }
    t = faithfulness_table(rows)
    a, b = t["variants"]["a"], t["variants"]["b"]
    assert a["questions"] == 3 and a["deletion_auc"] == pytest.approx(0.4) and a["insertion_auc"] == pytest.approx(0.8)
    assert a["energy_in_mask"] == pytest.approx(1.6 / 3) and a["topk_recall"] == 0.5 and a["centre_road_auc"] == 0.45
    agree = t["agreement"]
    assert agree["a"]["deletion"]["energy_in_mask"] == pytest.approx(1.0)
    assert agree["a"]["insertion"]["energy_in_mask"] == pytest.approx(1.0)
    # pointing game 1, 1, 0 against -deletion -0.4, -0.2, -0.6: ranks 2.5 2.5 1 vs 2 3 1 -> rho 0.866
    assert agree["a"]["deletion"]["pointing_game"] == pytest.approx(np.sqrt(3) / 2)
    assert agree["a"]["deletion"]["topk_recall"] is None          # 2 pairs only
    assert agree["c"]["deletion"]["pointing_game"] is None        # pointing game constant there
    # b: -deletion -0.5 -0.7 -0.3 (ranks 2 1 3) vs energy 0.2 0.0 0.4 (2 1 3): 1
    assert agree["b"]["deletion"]["energy_in_mask"] == pytest.approx(1.0)
    # over variant means: -deletion a -0.4, b -0.5, c -0.8; energy a 0.533, b 0.2, c 0.05: the same order
    assert agree["variants"]["deletion"]["energy_in_mask"] == pytest.approx(1.0)
    pooled = [r for rs in rows.values() for r in rs]
    from reports.agreement import spearman
    assert agree["pooled"]["road"]["energy_in_mask"] == pytest.approx(
        spearman([r["random_road_auc"] - r["road_auc"] for r in pooled], [r["energy_in_mask"] for r in pooled]))
    assert agree["level"]["deletion"]["energy_in_mask"] is None   # the random order's area is 0.5 throughout

    text = "\n".join(render_section(t, images=2))
    assert "on the first 2 held-out images (9 questions over all variants)" in text
    assert "| `a` | 0.400 | 0.500 | 0.400 | 0.800 | 0.500 | 0.600 | 0.300 | 0.500 | 0.450 |" in text
    assert "| questions of `a` | 0.866 / 1.000 / – | 0.866 / 1.000 / – |" in text
    assert "| variant means (3) |" in text and "| all questions |" in text
    assert "| level only: the random order's area, all questions | – / – / – |" in text
    assert "Read: over the variants' means, −deletion orders the variants as pointing does with rho 1.00" in text
    full = render_markdown({"a": {**_base_metrics(), "vqa_accuracy": 0.5}}, {}, seed=1, images=2, command="c",
                           findings=[], faithfulness=t, faithfulness_images=2)
    assert "## Heatmap faithfulness without masks" in full
    assert "## Heatmap faithfulness without masks" not in render_markdown(
        {"a": {**_base_metrics(), "vqa_accuracy": 0.5}}, {}, seed=1, images=2, command="c", findings=[])


def test_faithfulness_agreement_is_on_the_gain_over_the_random_order_not_the_questions_level():
    from reports.quality_faithfulness import faithfulness_table

    # the ITM matches the found objects' questions more strongly (random-order areas 0.3, 0.5, 0.7,
    # 0.9 rise with the energy), so the raw deletion area rises with the energy too; the heatmap's gain
    # over random (level - deletion: 0.2, 0.15, 0.1, 0.05) falls as the energy rises
    rows = {"a": [_faith_row(0.1, 0.5, 0.1, 0.0, 0.1, 0.1, level=0.3), _faith_row(0.35, 0.6, 0.35, 0.0, 0.2, 0.2, level=0.5),
                  _faith_row(0.6, 0.7, 0.6, 1.0, 0.3, 0.3, level=0.7), _faith_row(0.85, 0.8, 0.85, 1.0, 0.4, 0.4, level=0.9)]}
    agree = faithfulness_table(rows)["agreement"]
    assert agree["a"]["deletion"]["energy_in_mask"] == pytest.approx(-1.0)
    assert agree["level"]["deletion"]["energy_in_mask"] == pytest.approx(1.0)
    # insertion - random: 0.2 0.1 0.0 -0.1 (ranks 4 3 2 1) vs pointing 0 0 1 1 (1.5 1.5 3.5 3.5): -4 / sqrt(5 * 4)
    assert agree["a"]["insertion"]["pointing_game"] == pytest.approx(-2 / np.sqrt(5))


def _base_metrics():
    m = {f"accuracy_{t}": 0.5 for t in ("color", "shape", "count", "position", "exists")}
    return {**m, **{f"questions_{t}": 1 for t in ("color", "shape", "count", "position", "exists")},
            "questions": 5, "errors": 0, "pointing_game": 0.5, "energy_in_mask": 0.5, "topk_recall": 0.5}


def test_faithfulness_images_must_not_be_negative(capsys):
    with pytest.raises(SystemExit):
        main(["--faithfulness-images", "-1"])
    assert "--faithfulness-images: must be at least 0" in capsys.readouterr().err
