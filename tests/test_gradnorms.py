"""Stage 03 gradient norms: batched per-unit norms equal per-unit autograd; summary arithmetic."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dpbias_utils import gradnorms as gn
from dpbias_utils.stats import bootstrap_ci, bootstrap_diff_ci

PAD = 0
VOCAB = 40
# units: (unit_id, [row lengths]); rows of different lengths, 1- and 2-row units
UNITS = [(10, [7]), (11, [4, 9]), (12, [2]), (13, [9, 3]), (14, [5])]


def _tiny_gpt2(dtype=torch.float64, dropout=0.0, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2, n_head=2, tie_word_embeddings=True,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=1, eos_token_id=1,
        pad_token_id=PAD,
    )
    model = GPT2LMHeadModel(cfg).to(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


def _rows(seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for uid, lens in UNITS:
        for k, n in enumerate(lens):
            ids = torch.randint(1, VOCAB, (n,), generator=g)  # never the pad id: padding must not leak
            out.append((uid, k, ids))
    return out


def _hand_batch(rows):
    """Right-padded batch in the collate_units layout, built by hand."""
    T = max(len(r[2]) for r in rows)
    uids = list(dict.fromkeys(r[0] for r in rows))
    R = len(rows)
    input_ids = torch.full((R, T), PAD, dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    for i, (_, _, ids) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    position_ids = torch.arange(T).expand(R, T).contiguous()
    unit_index = torch.tensor([uids.index(r[0]) for r in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                unit_index=unit_index), uids


def _row_loss(model, ids):
    # not HF's labels= loss: it upcasts logits with .float(), i.e. float64 -> float32
    logits = model(input_ids=ids[None]).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:])


def _reference_norms(model, rows):
    """Each unit alone through autograd: unpadded rows, mean token CE (float64), summed over rows."""
    names = [n for n, _ in model.named_parameters()]
    groups = {
        "embeddings": [n for n in names if ".wte." in n or ".wpe." in n],
        "attention": [n for n in names if ".attn." in n],
        "mlp": [n for n in names if ".mlp." in n],
        "layernorm": [n for n in names if ".ln_" in n],
        "total": names,
    }
    assert sorted(sum((v for k, v in groups.items() if k != "total"), [])) == sorted(names)
    model.eval()
    ref = {}
    for uid in dict.fromkeys(r[0] for r in rows):
        model.zero_grad()
        loss = sum(_row_loss(model, ids) for u, _, ids in rows if u == uid)
        loss.backward()
        grads = dict((n, p.grad.detach().clone()) for n, p in model.named_parameters())
        rec = {"loss": float(loss.detach())}
        for g, ns in groups.items():
            flat = torch.cat([grads[n].flatten() for n in ns])
            rec[f"l1_{g}"] = float(flat.abs().sum())
            rec[f"l2_{g}"] = float(flat.norm())
        ref[uid] = rec
    model.zero_grad()
    return ref


def test_batched_norms_equal_per_unit_autograd_float64():
    model = _tiny_gpt2()
    rows = _rows()
    # shuffle rows so a unit's rows are not adjacent in the batch
    rows = [rows[i] for i in [3, 0, 5, 1, 6, 2, 4]]
    batch, uids = _hand_batch(rows)
    ref = _reference_norms(model, rows)
    model.eval()
    with gn._measuring(model):
        got = gn.batch_grad_norms(model, batch)
    cols = [f"{p}_{g}" for p in ("l1", "l2") for g in ("embeddings", "attention", "mlp", "layernorm", "total")]
    assert set(cols) <= set(got)
    for j, uid in enumerate(uids):
        for c in ["loss", *cols]:
            np.testing.assert_allclose(got[c][j], ref[uid][c], rtol=1e-9, err_msg=f"unit {uid} {c}")
    np.testing.assert_array_equal(got["n_rows"], [len(dict(UNITS)[u]) for u in uids])
    np.testing.assert_array_equal(got["n_predicted"], [sum(n - 1 for n in dict(UNITS)[u]) for u in uids])
    # group L2 norms compose the total
    sq = sum(got[f"l2_{g}"] ** 2 for g in ("embeddings", "attention", "mlp", "layernorm"))
    np.testing.assert_allclose(np.sqrt(sq), got["l2_total"], rtol=1e-12)


def test_tied_embedding_gradient_holds_both_uses():
    """Untie the head in a copy: the tied wte gradient must equal wte-grad + lm_head-grad of the copy."""
    model = _tiny_gpt2()
    rows = [r for r in _rows() if r[0] == 11]
    batch, _ = _hand_batch(rows)
    with gn._measuring(model):
        tied = gn.batch_grad_norms(model, batch, layer_groups={"wte": r"\.wte\."})
    import copy

    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    untied.eval()
    loss = sum(_row_loss(untied, ids) for _, _, ids in rows)
    loss.backward()
    g = untied.transformer.wte.weight.grad + untied.lm_head.weight.grad
    np.testing.assert_allclose(tied["l2_wte"][0], float(g.norm()), rtol=1e-9)
    assert not np.isclose(tied["l2_wte"][0], float(untied.transformer.wte.weight.grad.norm()))


def test_measuring_turns_dropout_off_and_restores_mode():
    model = _tiny_gpt2(dropout=0.3)
    rows = _rows()
    batch, uids = _hand_batch(rows)
    ref = _reference_norms(model, rows)  # eval mode
    model.train()
    attn = model.config._attn_implementation
    with gn._measuring(model):
        assert not model.training
        got = gn.batch_grad_norms(model, batch, chunk_size=2)
    assert model.training and model.config._attn_implementation == attn
    np.testing.assert_allclose(got["l2_total"], [ref[u]["l2_total"] for u in uids], rtol=1e-9)


def test_units_layout_fills_missing_rows_with_zero_weight():
    rows, w = gn._units_layout(torch.tensor([1, 0, 2, 1]))
    assert rows.tolist() == [[1, 1], [0, 3], [2, 2]]
    assert w.tolist() == [[1, 0], [1, 1], [1, 0]]


def test_default_layer_groups_cover_gpt2():
    model = _tiny_gpt2()
    names = [n for n, _ in model.named_parameters()]
    groups = gn.assign_layer_groups(names)
    assert set(groups) == {"embeddings", "attention", "mlp", "layernorm"}
    by = {g: {names[i] for i in idx} for g, idx in groups.items()}
    assert by["embeddings"] == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert "transformer.ln_f.weight" in by["layernorm"] and "transformer.h.0.attn.c_proj.bias" in by["attention"]
    assert "transformer.h.1.mlp.c_proj.weight" in by["mlp"]
    with pytest.raises(ValueError):
        gn.assign_layer_groups(names, lambda n: "total")


# ---------------------------------------------------------------------------------------------------
# summary arithmetic on hand-made norms
# ---------------------------------------------------------------------------------------------------


def _hand_per_example():
    f = pd.DataFrame({
        "unit_id": [1, 2, 3, 4], "split": "female",
        "l2_total": [0.05, 0.1, 0.2, 0.4], "l1_total": [1.0, 2.0, 3.0, 4.0], "l2_mlp": [0.01, 0.02, 0.03, 0.04],
        "loss": [2.0, 3.0, 4.0, 5.0], "nll_sum": [10.0, 30.0, 8.0, 5.0], "n_predicted": [5, 10, 2, 1],
        "n_tokens": [6, 11, 3, 2],
    })
    m = pd.DataFrame({
        "unit_id": [5, 6, 7], "split": "male",
        "l2_total": [0.08, 0.3, 0.1], "l1_total": [2.0, 2.0, 5.0], "l2_mlp": [0.05, 0.05, 0.02],
        "loss": [1.0, 2.0, 2.5], "nll_sum": [3.0, 4.0, 10.0], "n_predicted": [3, 2, 4], "n_tokens": [4, 3, 5],
    })
    s = f.assign(split="stereotypical", unit_id=f.unit_id + 100)
    a = m.assign(split="anti_stereotypical", unit_id=m.unit_id + 100)
    return pd.concat([f, m, s, a], ignore_index=True)


def _val(t, split, measure, checkpoint=None):
    sel = (t.split == split) & (t.measure == measure)
    if checkpoint is not None:
        sel &= t.checkpoint == checkpoint
    r = t[sel]
    assert len(r) == 1, (split, measure, len(r))
    return r.iloc[0]


def test_clip_fraction_and_factor_arithmetic():
    np.testing.assert_allclose(gn.clip_factor([0.05, 0.1, 0.2, 0.4], 0.1), [1.0, 1.0, 0.5, 0.25])
    np.testing.assert_allclose(gn.clipped([0.05, 0.1, 0.2, 0.4], 0.1), [0, 0, 1, 1])  # 0.1 is not > C
    t = gn.summarize_gradnorms(_hand_per_example(), max_grad_norm=0.1, n_boot=200, checkpoint="pct_100")
    assert list(t.columns) == gn.TIDY_COLUMNS and (t.checkpoint == "pct_100").all()
    assert _val(t, "female", "clip_fraction").value == pytest.approx(0.5)
    assert _val(t, "female", "clip_factor").value == pytest.approx((1 + 1 + 0.5 + 0.25) / 4)
    assert _val(t, "female", "clipped_l2_total").value == pytest.approx((0.05 + 0.1 + 0.1 + 0.1) / 4)
    assert _val(t, "male", "clip_fraction").value == pytest.approx(1 / 3)
    assert _val(t, "male", "clip_factor").value == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert _val(t, "female", "l2_total").value == pytest.approx(0.1875)
    assert _val(t, "female", "loss").value == pytest.approx(3.5)
    assert _val(t, "female", "perplexity").value == pytest.approx(np.exp(53 / 18))
    r = _val(t, "female", "clip_factor")
    assert r.ci_low <= r.value <= r.ci_high and r.n == 4


def test_summarize_diff_rows_equal_female_minus_male():
    pe = _hand_per_example()
    t = gn.summarize_gradnorms(pe, max_grad_norm=0.1, n_boot=300, seed=3)
    measures = set(t[t.split == "female"].measure)
    assert {"l1_total", "l2_total", "l2_mlp", "clip_fraction", "clip_factor", "loss", "perplexity"} <= measures
    for meas in measures:
        d = _val(t, "female-male", meas)
        assert d.value == pytest.approx(_val(t, "female", meas).value - _val(t, "male", meas).value)
        assert d.n == 7
        s = _val(t, "stereotypical-anti_stereotypical", meas)
        assert s.value == pytest.approx(d.value)
    # the interval is stats.bootstrap_diff_ci on the per-unit values
    f, m = pe[pe.split == "female"], pe[pe.split == "male"]
    exp = bootstrap_diff_ci(f.l2_total, m.l2_total, n_boot=300, seed=3)
    got = _val(t, "female-male", "l2_total")
    np.testing.assert_allclose([got.value, got.ci_low, got.ci_high], exp)
    exp1 = bootstrap_ci(gn.clip_factor(f.l2_total, 0.1), n_boot=300, seed=3)
    got1 = _val(t, "female", "clip_factor")
    np.testing.assert_allclose([got1.value, got1.ci_low, got1.ci_high], exp1)


def test_summarize_groups_by_checkpoint_and_run():
    pe = _hand_per_example()
    both = pd.concat([pe.assign(checkpoint="pct_0"), pe.assign(checkpoint="pct_100", l2_total=pe.l2_total * 2)])
    both["run"] = "dp"
    t = gn.summarize_gradnorms(both, max_grad_norm=0.1, n_boot=50)
    assert list(t.columns) == ["run", *gn.TIDY_COLUMNS]
    assert list(dict.fromkeys(t.checkpoint)) == ["pct_0", "pct_100"]
    assert _val(t, "female", "l2_total", "pct_100").value == pytest.approx(2 * 0.1875)


def test_plot_gap_over_training_from_table():
    import matplotlib

    matplotlib.use("Agg")
    pe = _hand_per_example()
    parts = [pe.assign(checkpoint=c, run=r) for c in ("pct_0", "pct_50", "pct_100") for r in ("dp", "non_dp")]
    t = gn.summarize_gradnorms(pd.concat(parts), max_grad_norm=0.1, n_boot=50)
    ax = gn.plot_gap_over_training(t, measure="l2_total")
    assert [x.get_text() for x in ax.get_xticklabels()] == ["pct_0", "pct_50", "pct_100"]
    assert len(ax.get_legend().get_texts()) == 2
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


# ---------------------------------------------------------------------------------------------------
# end to end through training.UnitDataset / collate_units
# ---------------------------------------------------------------------------------------------------

GENDER = {10: "female", 11: "male", 12: "female", 13: "female", 14: "male"}
OTHER = {"female": "male", "male": "female"}


def _frame(rows):
    recs = []
    for uid, k, ids in rows:
        g = GENDER[uid] if k == 0 else OTHER[GENDER[uid]]
        recs.append(dict(unit_id=uid, kind="original" if k == 0 else "counterfactual", text=f"u{uid}r{k}",
                         input_ids=ids.numpy().astype(np.int32), n_tokens=len(ids), gender=g, label="unlabelled"))
    return pd.DataFrame(recs).iloc[::-1].reset_index(drop=True)  # counterfactual rows before originals


def test_per_example_grad_norms_matches_reference_and_per_unit_loss():
    from dpbias_utils.training import collate_units, per_unit_loss

    model = _tiny_gpt2()
    rows = _rows()
    df = _frame(rows)
    ref = _reference_norms(model, rows)
    pe = gn.per_example_grad_norms(model, df, PAD, batch_size=2, progress=False)
    assert pe.unit_id.tolist() == sorted(GENDER)
    assert pe.gender.tolist() == [GENDER[u] for u in sorted(GENDER)]  # the original row's gender
    assert pe.n_rows.tolist() == [len(dict(UNITS)[u]) for u in sorted(GENDER)]
    assert pe.n_tokens.tolist() == [sum(dict(UNITS)[u]) for u in sorted(GENDER)]
    for c in ["loss", "l1_total", "l2_total", "l1_embeddings", "l2_attention", "l2_mlp", "l1_layernorm"]:
        np.testing.assert_allclose(pe[c], [ref[u][c] for u in pe.unit_id], rtol=1e-9, err_msg=c)
    # the loss is stage 02's per_unit_loss (which computes the CE in float32)
    items = [[ids for u, k, ids in sorted(rows, key=lambda r: r[1]) if u == uid] for uid in sorted(GENDER)]
    with torch.no_grad():
        l02 = per_unit_loss(model.eval(), collate_units(items, PAD))
    np.testing.assert_allclose(pe["loss"], l02.double().numpy(), rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_l2_total_is_the_norm_opacus_clips():
    """float32 model: our per-unit L2 equals stage 02's Opacus per-unit norms (rtol 1e-4)."""
    from opacus import GradSampleModule

    from dpbias_utils.training import UnitDataset, collate_units, dp_backward, per_sample_norms

    model = _tiny_gpt2(dtype=torch.float32)
    df = _frame(_rows())
    pe = gn.per_example_grad_norms(model, df, PAD, batch_size=16, progress=False)
    ds = UnitDataset(df, PAD)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    gsm.train()  # Opacus hooks capture nothing in eval mode; dropout is 0 in this model
    batch = collate_units([ds[i] for i in range(len(ds))], PAD)
    dp_backward(gsm, batch, gsm.parameters())
    norms = per_sample_norms(gsm.parameters()).detach().numpy()
    np.testing.assert_allclose(pe["l2_total"], norms, rtol=1e-4)


def test_gradnorms_over_training(tmp_path):
    model = _tiny_gpt2(dtype=torch.float32)
    model.save_pretrained(tmp_path / "pct_0")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "pct_100")
    df = _frame(_rows())
    splits = {s: df[df.unit_id.map(GENDER) == s] for s in ("female", "male")}
    ckpts = {"pct_0": tmp_path / "pct_0", "pct_100": tmp_path / "pct_100"}
    tidy, pe = gn.gradnorms_over_training(ckpts, splits, PAD, max_grad_norm=0.1, max_units_per_split=2,
                                          n_boot=50, progress=False)
    assert list(tidy.columns) == gn.TIDY_COLUMNS
    assert list(dict.fromkeys(tidy.checkpoint)) == ["pct_0", "pct_100"]
    assert set(tidy.split) == {"female", "male", "female-male"}
    assert (pe.groupby(["checkpoint", "split"]).size() == 2).all()
    # same units at every checkpoint
    u0 = pe[pe.checkpoint == "pct_0"].set_index(["split", "unit_id"])
    u1 = pe[pe.checkpoint == "pct_100"].set_index(["split", "unit_id"])
    assert u0.index.equals(u1.index)
    assert not np.allclose(u0.l2_total, u1.l2_total)
    v = _val(tidy, "female-male", "l2_total", "pct_0").value
    f = pe[(pe.checkpoint == "pct_0") & (pe.split == "female")].l2_total.mean()
    m = pe[(pe.checkpoint == "pct_0") & (pe.split == "male")].l2_total.mean()
    assert v == pytest.approx(f - m)


# ---------------------------------------------------------------------------------------------------
# summed gradients: surviving share and misalignment (Esipova et al. 2023)
# ---------------------------------------------------------------------------------------------------


def _reference_grads(model, rows):
    """unit_id -> its gradient as one flat float64 vector, each unit alone through loss.backward()."""
    model.eval()
    out = {}
    for uid in dict.fromkeys(r[0] for r in rows):
        model.zero_grad()
        sum(_row_loss(model, ids) for u, _, ids in rows if u == uid).backward()
        out[uid] = torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()]).numpy()
    model.zero_grad()
    return out


def _cos(x, y):
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def _hand_sums(vectors, C):
    acc = gn.GradSums(C)
    g = torch.tensor(vectors, dtype=torch.float64)
    acc.add({"w": g}, g.norm(dim=1))
    return acc


def test_gradient_sums_and_measures_equal_a_per_unit_loop_float64():
    """GradSums and sum_measures against explicit per-unit gradients (loss.backward one unit at a time)."""
    model = _tiny_gpt2()
    rows = _rows()
    df = _frame(rows)
    ref = _reference_grads(model, rows)
    C = float(np.median([np.linalg.norm(v) for v in ref.values()]))  # some units clipped, some not
    sums = {}
    for split in ("female", "male"):
        sums[split] = gn.GradSums(C)
        d = df[df.unit_id.map(GENDER) == split]
        gn.per_example_grad_norms(model, d, PAD, batch_size=2, chunk_size=1, progress=False, sums=sums[split])
    G, Gc = {}, {}
    for split in ("female", "male"):
        vs = [ref[u] for u in sorted(GENDER) if GENDER[u] == split]
        G[split] = sum(vs)
        Gc[split] = sum(min(1.0, C / np.linalg.norm(v)) * v for v in vs)
        assert sums[split].n == len(vs)
        flat = lambda d: torch.cat([d[n].flatten() for n, _ in model.named_parameters()]).numpy()  # noqa: E731
        np.testing.assert_allclose(flat(sums[split].grad), G[split], rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(flat(sums[split].clipped), Gc[split], rtol=1e-9, atol=1e-13)
    t = gn.sum_measures(sums, [("female", "male")], checkpoint="pct_0")
    assert list(t.columns) == gn.TIDY_COLUMNS and t.ci_low.isna().all() and (t.checkpoint == "pct_0").all()
    f, m = G["female"], G["male"]
    fc, mc = Gc["female"], Gc["male"]
    expect = {
        ("female", "sum_share"): np.linalg.norm(fc) / np.linalg.norm(f),
        ("female", "misalignment_cos"): _cos(fc, f),
        ("male", "misalignment_cos"): _cos(mc, m),
        ("female", "pooled_cos"): _cos(f, f + m),
        ("female", "pooled_cos_clipped"): _cos(f, fc + mc),
        ("male", "pooled_cos_clipped"): _cos(m, fc + mc),
        ("female-male", "misalignment_cos"): _cos(fc, f) - _cos(mc, m),
        ("female-male", "pair_cos"): _cos(f, m),
        ("female-male", "pair_cos_clipped"): _cos(fc, mc),
        ("female-male", "pair_norm_ratio"): np.linalg.norm(f) / np.linalg.norm(m),
        ("female-male", "pair_norm_ratio_clipped"): np.linalg.norm(fc) / np.linalg.norm(mc),
    }
    for (split, measure), v in expect.items():
        assert _val(t, split, measure).value == pytest.approx(v, rel=1e-9), (split, measure)
    assert _val(t, "female", "misalignment_cos").value < 1 - 1e-6  # clipping did turn the sum
    assert _val(t, "female-male", "pair_cos").n == len(GENDER)


def test_nothing_clipped_means_no_misalignment():
    model = _tiny_gpt2()
    df = _frame(_rows())
    pe = gn.per_example_grad_norms(model, df, PAD, batch_size=16, progress=False)
    C = 10 * pe.l2_total.max()
    sums = {s: gn.GradSums(C) for s in ("female", "male")}
    for s in sums:
        got = gn.per_example_grad_norms(model, df[df.unit_id.map(GENDER) == s], PAD, progress=False, sums=sums[s])
        want = pe[pe.unit_id.isin(got.unit_id)].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, rtol=1e-12)  # accumulating the sums changes no norm
    t = gn.sum_measures(sums, [("female", "male")]).set_index(["split", "measure"]).value
    for s in ("female", "male"):
        assert t[(s, "misalignment_cos")] == pytest.approx(1.0, abs=1e-12)
        assert t[(s, "sum_share")] == pytest.approx(1.0, abs=1e-12)
        assert t[(s, "pooled_cos_clipped")] == pytest.approx(t[(s, "pooled_cos")], abs=1e-12)
    assert t[("female-male", "pair_cos_clipped")] == pytest.approx(t[("female-male", "pair_cos")], abs=1e-12)
    norm_share = _val(gn.summarize_gradnorms(pe, C, n_boot=20), "all", "norm_share")
    assert norm_share.value == norm_share.ci_low == norm_share.ci_high == 1.0


def test_sum_measures_hand_case():
    # female: g = (3, 0), (0, 1), (0, 0) at C = 1 -> clipped (1, 0), (0, 1), (0, 0); G = (3, 1), G~ = (1, 1)
    # male:   g = (0, 2)                            -> clipped (0, 1);               G = (0, 2), G~ = (0, 1)
    sums = {"female": _hand_sums([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], 1.0), "male": _hand_sums([[0.0, 2.0]], 1.0)}
    np.testing.assert_allclose(sums["female"].clipped["w"], [1.0, 1.0])
    t = gn.sum_measures(sums, [("female", "male")])
    r2, r10, r18, r50 = np.sqrt([2, 10, 18, 50])
    expect = {
        ("female", "sum_share"): r2 / r10, ("female", "misalignment_cos"): 4 / (r10 * r2),
        ("male", "sum_share"): 0.5, ("male", "misalignment_cos"): 1.0,
        ("female", "pooled_cos"): 12 / (r10 * r18),  # G_D = (3, 3)
        ("female", "pooled_cos_clipped"): 5 / r50,  # G~_D = (1, 2)
        ("male", "pooled_cos"): 6 / (2 * r18), ("male", "pooled_cos_clipped"): 2 / np.sqrt(5),
        ("female-male", "sum_share"): r2 / r10 - 0.5,
        ("female-male", "pair_cos"): 1 / r10, ("female-male", "pair_cos_clipped"): 1 / r2,
        ("female-male", "pair_norm_ratio"): r10 / 2, ("female-male", "pair_norm_ratio_clipped"): r2,
    }
    for (split, measure), v in expect.items():
        assert _val(t, split, measure).value == pytest.approx(v, rel=1e-12), (split, measure)
    assert _val(t, "female", "sum_share").n == 3 and _val(t, "female-male", "pair_cos").n == 4
    # the per-unit surviving share: sum_i min(||g_i||, C) / sum_i ||g_i|| = (1 + 1 + 0) / (3 + 1 + 0)
    pe = pd.DataFrame({"unit_id": [1, 2, 3], "l2_total": [3.0, 1.0, 0.0]})
    assert _val(gn.summarize_gradnorms(pe, 1.0, n_boot=20), "all", "norm_share").value == pytest.approx(0.5)
    # a zero sum has no direction
    assert np.isnan(_val(gn.sum_measures({"z": _hand_sums([[0.0, 0.0]], 1.0)}), "z", "misalignment_cos").value)


def test_sum_measures_bad_input():
    with pytest.raises(ValueError, match="max_grad_norm must be a positive finite number .* got 0"):
        gn.GradSums(0)
    with pytest.raises(ValueError, match="max_grad_norm .* got inf"):
        gn.GradSums(float("inf"))
    sums = {s: _hand_sums([[1.0, 0.0]], 1.0) for s in "abc"}
    with pytest.raises(ValueError, match=r"splits \['a'\] are in more than one of the contrasts"):
        gn.sum_measures(sums, [("a", "b"), ("a", "c")])


def test_norm_share_interval_and_contrast():
    t = gn.summarize_gradnorms(_hand_per_example(), 0.1, n_boot=200, seed=0)
    f = _val(t, "female", "norm_share")
    assert f.value == pytest.approx((0.05 + 0.1 + 0.1 + 0.1) / (0.05 + 0.1 + 0.2 + 0.4))
    assert f.ci_low <= f.value <= f.ci_high and f.ci_low < f.ci_high
    m = _val(t, "male", "norm_share").value
    assert m == pytest.approx((0.08 + 0.1 + 0.1) / (0.08 + 0.3 + 0.1))
    assert _val(t, "female-male", "norm_share").value == pytest.approx(f.value - m)


def test_gradnorms_over_training_cda_pairs_and_sum_rows(tmp_path):
    from dpbias_utils.data.units import CDA_PAIR_SPLITS, cda_pair_splits

    model = _tiny_gpt2(dtype=torch.float32)
    model.save_pretrained(tmp_path / "pct_0")
    df = _frame(_rows())  # units 11 and 13 have an original and a counterfactual row
    pairs = cda_pair_splits(df)
    assert list(pairs) == list(CDA_PAIR_SPLITS)
    assert pairs["cda_original"].unit_id.tolist() == pairs["cda_counterfactual"].unit_id.tolist() == [11, 13]
    assert set(pairs["cda_original"].kind) == {"original"}
    assert set(pairs["cda_counterfactual"].kind) == {"counterfactual"}
    originals = df[df.kind == "original"]
    splits = {"female": originals[originals.gender == "female"], "male": originals[originals.gender == "male"], **pairs}
    tidy, pe = gn.gradnorms_over_training({"pct_0": tmp_path / "pct_0"}, splits, PAD, max_grad_norm=0.05,
                                          max_units_per_split=1, n_boot=20, progress=False)
    assert list(pe.split.drop_duplicates()) == list(splits)  # per-example rows keep the split order
    chosen = pe.groupby("split").unit_id.apply(list)
    assert chosen["cda_original"] == chosen["cda_counterfactual"]  # the same unit on both sides of a pair
    pair = "cda_original-cda_counterfactual"
    for split, measures in [("female", gn.SPLIT_SUM_MEASURES), (pair, gn.PAIR_SUM_MEASURES + gn.SPLIT_SUM_MEASURES),
                            (pair, ("l2_total", "norm_share", "clip_fraction"))]:
        for measure in measures:
            assert np.isfinite(_val(tidy, split, measure).value), (split, measure)
    # the pair's summed gradients are the one unit's two rows' gradients: compare with per-unit norms
    l2 = pe.set_index("split").l2_total
    ratio = l2["cda_original"] / l2["cda_counterfactual"]
    assert _val(tidy, pair, "pair_norm_ratio").value == pytest.approx(ratio, rel=1e-5)
    with pytest.raises(Exception, match="one original and one counterfactual row per paired unit"):
        cda_pair_splits(df[df.kind == "counterfactual"])


def test_misalignment_figure_and_cda_pair_table():
    from dpbias_utils import plots

    def at(ckpt, scale, cda):
        sums = {"female": _hand_sums([[3.0, 0.0], [0.0, 1.0]], scale), "male": _hand_sums([[0.0, 2.0]], scale)}
        if cda:
            sums |= {"cda_original": _hand_sums([[1.0, 2.0]], scale),
                     "cda_counterfactual": _hand_sums([[2.0, 1.0]], scale)}
        return gn.sum_measures(sums, gn.DEFAULT_CONTRASTS, checkpoint=ckpt)

    plain = pd.concat([at("pct_0", 1.0, False), at("pct_100", 0.5, False)], ignore_index=True)
    shown = plots.gradnorm_misalignment(plain, 1.0, "DP ε=3, CDA 0, seed 0")
    assert len(shown.panels) == 2 and shown.empty == []
    assert "no counterfactual rows" in plots.gradnorm_cda_pairs(plain).rows["CDA pairs"]
    cda = pd.concat([at("pct_0", 1.0, True), at("pct_100", 0.5, True)], ignore_index=True)
    table = plots.gradnorm_cda_pairs(cda)
    assert table.index.tolist() == ["pct_0", "pct_100"] and table.columns.tolist() == list(gn.PAIR_SUM_MEASURES)
    assert table.loc["pct_0", "pair_cos"] == pytest.approx(4 / 5)
    assert table.loc["pct_0", "pair_norm_ratio"] == pytest.approx(1.0)
    final = plots.gradnorm_final(cda)
    assert final.loc["misalignment_cos", "male"] == "1"  # a point value has no interval


def test_nonbinary_split_gets_the_norm_clip_and_misalignment_measures(tmp_path):
    """Stage 03 on a ``nonbinary`` split (units.gender_splits gives it for a corpus with non-binary
    subjects) beside female / male: its per-example and summed-gradient measures against per-unit
    autograd gradients."""
    model = _tiny_gpt2(dtype=torch.float32)
    model.save_pretrained(tmp_path / "pct_0")
    rows = [r for r in _rows() if r[1] == 0]  # originals: non-binary units have no counterfactual
    nonbinary = {12, 14}
    df = _frame(rows)
    df["gender"] = [("nonbinary" if u in nonbinary else g) for u, g in zip(df.unit_id, df.gender)]
    splits = {s: df[df.gender == s] for s in ("female", "male", "nonbinary")}
    splits["binary"] = df[df.gender.isin(["female", "male"])]  # units.gender_splits' comparison group
    ref = _reference_grads(_tiny_gpt2(dtype=torch.float32).double(), rows)
    C = float(np.mean([np.linalg.norm(ref[u]) for u in nonbinary]))  # one non-binary unit clipped, one not
    tidy, pe = gn.gradnorms_over_training({"pct_0": tmp_path / "pct_0"}, splits, PAD, max_grad_norm=C,
                                          n_boot=20, progress=False)
    vs = [ref[u] for u in sorted(nonbinary)]
    G = sum(vs)
    Gc = sum(min(1.0, C / np.linalg.norm(v)) * v for v in vs)
    assert _val(tidy, "nonbinary", "sum_share").value == pytest.approx(np.linalg.norm(Gc) / np.linalg.norm(G), rel=1e-4)
    assert _val(tidy, "nonbinary", "misalignment_cos").value == pytest.approx(_cos(Gc, G), rel=1e-4)
    norms = [np.linalg.norm(v) for v in vs]
    assert _val(tidy, "nonbinary", "l2_total").value == pytest.approx(np.mean(norms), rel=1e-4)
    assert _val(tidy, "nonbinary", "clip_fraction").value == pytest.approx(np.mean([n > C for n in norms])) == 0.5
    assert _val(tidy, "nonbinary", "l2_total").n == 2
    assert set(pe[pe.split == "nonbinary"].unit_id) == nonbinary
    assert {"female-male", "female", "male"} <= set(tidy.split)  # the binary contrast as before
    # the contrast with the female and male units together, and Esipova et al.'s pooled cosines
    binary = [ref[u] for u in sorted(ref) if u not in nonbinary]
    B = sum(binary)
    Bc = sum(min(1.0, C / np.linalg.norm(v)) * v for v in binary)
    contrast = "nonbinary-binary"
    assert _val(tidy, contrast, "l2_total").value == pytest.approx(
        np.mean(norms) - np.mean([np.linalg.norm(v) for v in binary]), rel=1e-4)
    assert _val(tidy, "nonbinary", "pooled_cos").value == pytest.approx(_cos(G, G + B), rel=1e-4)
    assert _val(tidy, "nonbinary", "pooled_cos_clipped").value == pytest.approx(_cos(G, Gc + Bc), rel=1e-4)
    assert _val(tidy, contrast, "pair_cos_clipped").value == pytest.approx(_cos(Gc, Bc), rel=1e-4)
    assert _val(tidy, contrast, "l2_total").n == 5
