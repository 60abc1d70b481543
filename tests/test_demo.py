"""The demo's summary: the grounding table with both ceilings and PLAN against the global-only baseline, from the
evaluations' metrics.json (hand-made here, so every number in the text is known)."""

from plan_hf.cli.demo import comparison, grounding_table


def summary(pointing, signed_cnr, low, high):
    macro = {"pointing": pointing, "cnr": abs(signed_cnr), "signed_cnr": signed_cnr, "miou": 0.1}
    ci = {name: {"low": value - (pointing - low), "high": value + (high - pointing)} for name, value in macro.items()}
    return {"macro": macro, "ci": ci, "chance_pointing": 0.05}


def evaluation(rows, accuracy=0.5):
    return {"grounding": rows, "zero_shot": {"multiclass": {"accuracy": accuracy, "macro_auc": 0.8}},
            "retrieval": {"i2t_recall@10": 0.2, "t2i_recall@10": 0.3}}


PLAN = evaluation({"local": summary(0.45, 0.9, 0.40, 0.50), "global": summary(0.10, 0.8, 0.08, 0.12),
                   "position_prior": summary(0.32, 1.4, 0.3, 0.34), "supervised_ceiling": summary(0.9, 1.1, 0.85, 0.95),
                   "grid_ceiling": summary(0.88, 4.1, 0.85, 0.9)}, accuracy=0.55)
GLOBAL = evaluation({"global": summary(0.09, -0.2, 0.07, 0.11), "local": summary(0.03, 0.1, 0.0, 0.06)})


def test_grounding_table_has_the_model_maps_both_ceilings_and_chance():
    lines = grounding_table({"plan": PLAN, "global": GLOBAL})
    text = "\n".join(lines)
    assert lines[0] == "| map | pointing | cnr | signed_cnr | miou |"
    assert "| PLAN: local map (word-pixel alignment) | 0.450 [0.400, 0.500]" in text
    assert "| global-only model: global-embedding map | 0.090 [0.070, 0.110]" in text
    assert "supervised ceiling" in text and "grid ceiling" in text and lines[-1].startswith("| chance")
    assert "position prior + location words" not in text  # a row the evaluation does not have is left out
    assert "global-only model: local" not in text  # the untrained local path of a global-only model is no baseline


def test_comparison_says_by_how_much_and_whether_the_intervals_separate():
    lines = comparison({"plan": PLAN, "global": GLOBAL})
    assert lines[0] == ("- pointing: PLAN's local map 0.450, the global-only model's map 0.090: +0.360 (5.0x; the 95% "
                        "intervals do not overlap).")
    assert lines[1].startswith("- signed_cnr: PLAN's local map 0.900, the global-only model's map -0.200")
    assert "| PLAN | 0.550 | 0.800 | 0.200 | 0.300 |" in lines and "| global-only | 0.500 | 0.800 | 0.200 | 0.300 |" in lines
    close = evaluation({"global": summary(0.42, 0.8, 0.37, 0.47)})
    assert "overlap: not a difference" in comparison({"plan": PLAN, "global": close})[0]
    assert "no global-only baseline" in comparison({"plan": PLAN})[0]
