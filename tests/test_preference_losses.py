"""Preference losses against TRL 1.16 itself: the same tiny model, LoRA weights and batch.

TRL's side: the torch model with the same LoRA loaded by `peft.PeftModel` from our PEFT folder; its per-token
log-probs (the reference with `disable_adapter()`, PEFT's own switch) go into TRL's `DPOTrainer._compute_loss`
and ORPO's `get_batch_loss_metrics`, run on a stand-in for the trainer object (the trainers themselves need a
hub tokenizer and accelerate state; the loss code is TRL's, unchanged). Loss and every logged metric within
1e-5 (fp32); the gradient w.r.t. the LoRA leaves within 1e-4 of torch's backward through TRL's loss.
"""

from __future__ import annotations

import collections
import copy
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpeft.core.partition import combine, split_trainable  # noqa: E402
from jaxpeft.core.tree import flatten_params  # noqa: E402
from jaxpeft.methods.lora import Lora, LoraConfig, save_peft_adapter  # noqa: E402
from jaxpeft.preference.logps import sequence_stats  # noqa: E402
from jaxpeft.preference.losses import preference_loss  # noqa: E402

PAIRS, SEQ = 3, 13
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def _batch(vocab: int):
    """3 pairs, right-padded, prompts of different lengths, chosen first then rejected (TRL's layout)."""
    rng = np.random.default_rng(3)
    prompt_lens, chosen_lens, rejected_lens = [4, 6, 3], [5, 2, 7], [3, 6, 4]
    ids = np.zeros((2 * PAIRS, SEQ), np.int32)
    attn, comp = np.zeros_like(ids), np.zeros_like(ids)
    for i in range(PAIRS):
        prompt = rng.integers(3, vocab, prompt_lens[i])
        for row, n in ((i, chosen_lens[i]), (PAIRS + i, rejected_lens[i])):
            seq = np.concatenate([prompt, rng.integers(3, vocab, n)])
            ids[row, :len(seq)], attn[row, :len(seq)], comp[row, prompt_lens[i]:len(seq)] = seq, 1, 1
    return ids, attn, comp


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    hf, model, params = tiny_base(seed=4, layers=1)  # one layer: a third of the compile time
    cfg = LoraConfig(r=3, lora_alpha=5.0, target_modules=("q_proj", "v_proj", "down_proj"))
    params = Lora().init(jax.random.PRNGKey(1), params, cfg)
    # Non-zero B, so the policy differs from the reference.
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, params)
    folder = tmp_path_factory.mktemp("pref") / "adapter"
    save_peft_adapter(folder, params, cfg, base_model_name_or_path="tiny")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf).float(), str(folder), is_trainable=True).eval()
    return model, params, cfg, pm, _batch(hf.config.vocab_size)


_JITTED: dict = {}


def _ours(setup, loss: str, beta: float, eps: float, sft: float = 0.0):
    """Our loss, metrics and LoRA gradients; one compilation per loss kind and sft weight (beta and eps are
    traced)."""
    model, params, cfg, _, (ids, attn, comp) = setup
    lora = Lora()
    trainable, frozen = split_trainable(params, lora.labels(params, cfg))
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(comp)}
    if (loss, sft) not in _JITTED:
        def f(tr, fr, batch, beta, eps):
            seq = sequence_stats(model, combine(fr, tr), batch, max_targets=2 * PAIRS * SEQ,
                                 is_added=lambda p: lora.is_added(p, cfg), loss=loss)
            return preference_loss(loss, seq, beta=beta, label_smoothing=eps, sft_weight=sft)

        _JITTED[loss, sft] = jax.jit(jax.value_and_grad(f, has_aux=True))
    (value, metrics), grads = _JITTED[loss, sft](trainable, frozen, batch, jnp.float32(beta), jnp.float32(eps))
    return float(value), {k: float(v) for k, v in metrics.items()}, flatten_params(grads)


def _token_logps(pm, ids, attn, comp):
    logits = pm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(attn)).logits.float()
    labels = torch.tensor(ids[:, 1:], dtype=torch.long)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[..., None])[..., 0]
    return lp * torch.tensor(comp[:, 1:], dtype=torch.float32), logits


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_dpo(setup, loss_type: str, beta: float, eps: float, pairs: int = PAIRS, sft: float = 0.0):
    from trl.trainer.dpo_trainer import DPOTrainer

    _, _, _, pm, (ids, attn, comp) = setup
    pm.zero_grad()
    with torch.no_grad(), pm.disable_adapter():
        ref = _token_logps(pm, ids, attn, comp)[0].sum(1)

    def fake_model(**kw):  # TRL's fused head returns per-token log-probs; we compute them plainly
        lp, logits = _token_logps(pm, ids, attn, comp)
        r, s = lp.shape
        return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros(r, s), mean_logits=logits[:, :-1].mean(-1),
                                     is_top1=torch.zeros(r, s, dtype=torch.bool))

    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type, "sft"] if sft else [loss_type], loss_weights=[1.0, sft] if sft else [1.0], beta=beta, label_smoothing=eps, use_weighting=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace())
    inputs = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(attn),
              "completion_mask": torch.tensor(comp), "ref_chosen_logps": ref[:pairs], "ref_rejected_logps": ref[pairs:]}
    loss = DPOTrainer._compute_loss(stub, fake_model, inputs, False)
    loss.backward()
    return float(loss.detach()), {k: v[-1] for k, v in stub._metrics["train"].items()}


def _torch_lora_grads(pm) -> dict[tuple[str, ...], np.ndarray]:
    """{(module path..., lora_a|lora_b): gradient in our (in, out) layout} from the peft model's backward."""
    out = {}
    for name, p in pm.named_parameters():
        if ".lora_" in name and p.grad is not None:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            leaf = "lora_a" if ".lora_A." in name else "lora_b"
            out[(*module.split("."), leaf)] = p.grad.detach().numpy().T
    return out


def _check_grads(ours, pm):
    theirs = _torch_lora_grads(pm)
    ours = {p: np.asarray(g) for p, g in ours.items() if p[-1] in ("lora_a", "lora_b")}
    assert set(ours) == set(theirs) and ours
    for path, g in theirs.items():
        np.testing.assert_allclose(ours[path], g, atol=1e-4, rtol=0, err_msg=".".join(path))
    assert max(np.abs(g).max() for g in theirs.values()) > 1e-3  # a gradient big enough to differ


@pytest.mark.parametrize("loss,trl_loss,beta,eps", [("dpo", "sigmoid", 0.1, 0.0), ("dpo", "sigmoid", 0.7, 0.0),
                                                    ("ipo", "ipo", 0.3, 0.0)])
def test_dpo_ipo_match_trl(setup, loss, trl_loss, beta, eps):
    value, metrics, grads = _ours(setup, loss, beta, eps)
    trl_value, trl_metrics = _trl_dpo(setup, trl_loss, beta, eps)
    assert abs(value - trl_value) < 1e-5, (value, trl_value)
    for k in DPO_METRICS:
        assert abs(metrics[k] - trl_metrics[k]) < 1e-5, (k, metrics[k], trl_metrics[k])
    assert metrics["rewards/margins"] != 0.0  # the adapter moved the policy off the reference
    _check_grads(grads, setup[3])


@pytest.mark.parametrize("loss,trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_sft_weight_matches_trls_multi_loss_with_sft(setup, loss, trl_loss):
    """--sft_weight=w is TRL's loss_type=[<loss>, "sft"], loss_weights=[1, w] (RPO)."""
    beta, w = 0.1, 0.6
    value, metrics, grads = _ours(setup, loss, beta, 0.0, sft=w)
    trl_value, trl_metrics = _trl_dpo(setup, trl_loss, beta, 0.0, sft=w)
    assert abs(value - trl_value) < 1e-5, (value, trl_value)
    for k in DPO_METRICS:
        assert abs(metrics[k] - trl_metrics[k]) < 1e-5, (k, metrics[k], trl_metrics[k])
    plain, _, _ = _ours(setup, loss, beta, 0.0)
    assert value - plain > 0.1  # the chosen NLL (several nats a token on random ids) was added
    _check_grads(grads, setup[3])


def test_dpo_label_smoothing_matches_trl_conservative_form(setup):
    """TRL 1.16's `sigmoid` no longer reads label_smoothing; its `aot` loss on a batch of one pair is the
    conservative DPO form -(1-e) log s(b d) - e log s(-b d). Pair by pair against it: the mean equals ours."""
    beta, eps = 0.2, 0.15
    value, metrics, _ = _ours(setup, "dpo", beta, eps)
    plain, _, _ = _ours(setup, "dpo", beta, 0.0)
    ids, attn, comp = setup[4]
    per_pair = [_trl_dpo((*setup[:4], (ids[[i, PAIRS + i]], attn[[i, PAIRS + i]], comp[[i, PAIRS + i]])), "aot",
                         beta, eps, pairs=1)[0] for i in range(PAIRS)]
    assert abs(value - float(np.mean(per_pair))) < 1e-5, (value, per_pair)
    assert abs(value - plain) > 1e-4  # the smoothing changed the loss


def test_orpo_matches_trl(setup):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    beta = 0.25
    value, metrics, grads = _ours(setup, "orpo", beta, 0.0)
    _, _, _, pm, (ids, attn, comp) = setup
    pm.zero_grad()
    labels = np.where(comp > 0, ids, -100)
    stub = types.SimpleNamespace(is_encoder_decoder=False, padding_value=0, label_pad_token_id=-100,
                                 accelerator=_Accelerator(), aux_loss_enabled=False, beta=beta)
    stub.concatenated_inputs = lambda batch, **kw: {
        "concatenated_input_ids": torch.tensor(ids, dtype=torch.long),
        "concatenated_attention_mask": torch.tensor(attn), "concatenated_labels": torch.tensor(labels)}
    stub.concatenated_forward = types.MethodType(ORPOTrainer.concatenated_forward, stub)
    stub.get_batch_logps = ORPOTrainer.get_batch_logps
    stub.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, stub)
    batch = {"chosen_labels": torch.tensor(labels[:PAIRS])}
    loss, trl_metrics = ORPOTrainer.get_batch_loss_metrics(stub, pm, batch)
    loss.backward()
    assert abs(value - float(loss)) < 1e-5, (value, float(loss))
    for k in DPO_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert abs(metrics[k] - float(trl_metrics[k])) < 1e-5, (k, metrics[k], float(trl_metrics[k]))
    _check_grads(grads, pm)


def test_bad_preference_settings_are_listed_in_one_error():
    from jaxpeft.core.errors import ConfigError
    from jaxpeft.preference.step import PreferenceConfig

    with pytest.raises(ConfigError, match=r"beta=0.*sft_weight=-1.*expected >= 0"):
        PreferenceConfig(loss="dpo", beta=0.0, sft_weight=-1.0)
    with pytest.raises(ConfigError, match="sft_weight applies to loss=dpo or ipo; orpo has its own NLL term"):
        PreferenceConfig(loss="orpo", sft_weight=0.5)
    assert PreferenceConfig(loss="ipo", sft_weight=0.5).sft_weight == 0.5


def test_the_entry_points_sft_weight_default_is_one_for_dpo_and_ipo_and_off_for_orpo():
    from absl import flags

    from experiments import dpo

    def weight(*argv):
        fv = flags.FlagValues()
        dpo.define_flags(fv)
        fv(["dpo", *argv])
        return dpo._sft_weight(fv)

    assert weight() == 1.0 and weight("--loss=ipo") == 1.0 and weight("--sft_weight=0") == 0.0
    assert weight("--loss=orpo") == 0.0
    assert weight("--loss=orpo", "--sft_weight=0.5") == 0.5  # given explicitly: PreferenceConfig refuses it
