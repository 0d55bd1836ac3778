"""kfac_fast inside other people's training loops: Hugging Face ``Trainer`` (a tiny random
LlamaForCausalLM, no downloads) and Lightning. Each test skips when its library is absent.

What is checked: the loop runs its 20 steps with the K-FAC preconditioner (attached to AdamW)
or KFAC itself as the optimizer, the K-FAC step counter advanced once per optimizer step (the
hook ran every time), and the training loss fell.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac_fast

STEPS = 20


def _llama(attn: str = "sdpa"):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


class _Counting(torch.utils.data.Dataset):
    """Sequences t, t+1, t+2, ... (mod 64) from random starts: learnable next-token structure."""

    def __init__(self, n=64, T=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (n, 1), generator=g)
        self.ids = (start + torch.arange(T)) % 64

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def _train(model, optimizers, tmp_path, **training_args):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="Hugging Face Trainer needs accelerate")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8,
                                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                          dataloader_num_workers=0, max_grad_norm=1.0, seed=0, **training_args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Counting(), optimizers=optimizers)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    return losses


@pytest.mark.parametrize("fisher,checkpointing", [("empirical", False), ("mc", True)])
def test_hf_trainer_with_preconditioner_attached_to_adamw(tmp_path, fisher, checkpointing):
    """The Trainer's backward retains no graph: the MC Fisher's sampled backward runs inside it;
    with gradient_checkpointing=True the recomputation in the backward is not a pass."""
    torch.set_num_threads(1)
    model = _llama()
    pre = kfac_fast.KFACPreconditioner(model, loss="softmax_cross_entropy", fisher=fisher, capture="hooks",
                                       damping=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.05 * k))
    pre.attach(opt, targets=lambda batch: kfac_fast.causal_lm_targets(batch["labels"]))
    losses = _train(model, (opt, sched), tmp_path, gradient_checkpointing=checkpointing)
    assert model.is_gradient_checkpointing == checkpointing
    assert pre.k == STEPS + 1  # preconditioned at every optimizer step
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_hf_trainer_with_kfac_as_the_optimizer(tmp_path):
    torch.set_num_threads(1)
    model = _llama()  # SDPA attention (the J·v providers fall back to its math backend)
    opt = kfac_fast.KFAC(model, loss="softmax_cross_entropy", lambda_init=1.0, T3=5, T2=10,
                         targets=lambda batch: kfac_fast.causal_lm_targets(batch["labels"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.05 * k))
    losses = _train(model, (opt, sched), tmp_path)
    assert opt.k == STEPS + 1
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 / (1 + 0.05 * STEPS))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_lightning_with_kfac_and_with_attached_preconditioner(tmp_path):
    L = pytest.importorskip("lightning")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    class Module(L.LightningModule):
        def __init__(self, use_kfac: bool):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
            self.use_kfac = use_kfac
            self.losses = []

        def training_step(self, batch, _):
            xb, yb = batch
            if self.use_kfac:
                self.kfac.set_targets(yb)
            else:
                self.pre.set_targets(yb)
            loss = F.cross_entropy(self.net(xb), yb)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):
            if self.use_kfac:
                self.kfac = kfac_fast.KFAC(self.net, loss="softmax_cross_entropy")
                return self.kfac
            opt = torch.optim.SGD(self.net.parameters(), lr=0.3)
            self.pre = kfac_fast.KFACPreconditioner(self.net, loss="softmax_cross_entropy", capture="hooks",
                                                    fisher="empirical", damping=0.1)
            self.pre.attach(opt)
            return opt

    for use_kfac in (True, False):
        m = Module(use_kfac)
        trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(m, loader)
        k = m.kfac.k if use_kfac else m.pre.k
        assert k == STEPS + 1
        assert sum(m.losses[-3:]) / 3 < m.losses[0] - 0.3, (use_kfac, m.losses)
