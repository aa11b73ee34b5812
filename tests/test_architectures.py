"""The operator on the architectures researchers analyse, against finite differences.

The reference differentiates first-order gradients numerically (central differences, float64), so
it shares nothing with the operator's second derivatives: where torch's own double backward is
wrong (weight norm) or missing (fused attention), autograd cannot be the judge. Each model is
tiny (at most a few hundred parameters) and smooth where the differences are taken.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

from hessian_cli.engine import HessianOperator, alignment_scores, eigenpairs
from hessian_cli.errors import UserError

VOCAB, TOKENS, WIDTH = 7, 4, 4


class Attention(nn.Module):
    """A pre-norm transformer block on token ids: nn.MultiheadAttention (which calls
    scaled_dot_product_attention when no weights are asked for), LayerNorm, a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 6), nn.GELU(), nn.Linear(6, WIDTH))
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


class CausalAttention(nn.Module):
    """Causal self-attention written with F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        q, k, v = self.qkv(h).view(len(h), TOKENS, 3, 2, WIDTH // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(torch.tanh(h + a.transpose(1, 2).reshape(h.shape)).mean(1))


class Encoder(nn.Module):
    """nn.TransformerEncoder with a padding mask (token 0), as a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 6, dropout=0.1, batch_first=True)
        with warnings.catch_warnings():  # enable_nested_tensor's note on odd head widths
            warnings.simplefilter("ignore")
            self.enc = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(tokens), src_key_padding_mask=tokens == 0)
        return self.head(h.mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.cudnn_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cudnn_seen.append(torch.backends.cudnn.enabled)
        return self.head(self.rnn(x)[0][:, -1])


class Conv(nn.Module):
    """BatchNorm, Dropout (off in the analysis), a depthwise convolution, GroupNorm, pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.depthwise = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.gn = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():  # running statistics of a trained model
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.bn(self.conv(x))))
        h = torch.tanh(self.gn(self.depthwise(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Softplus(torch.autograd.Function):
    """softplus with a hand-written backward in torch operations, and no jvp."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class SoftplusOnce(Softplus):
    """The same, its backward marked @once_differentiable."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class MLP(nn.Module):
    """5 -> 6 -> out, its hidden layer given by ``layer`` and ``act``, whatever they do."""

    def __init__(
        self,
        layer: Callable[[nn.Module], nn.Module] = lambda m: m,
        act: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
        out: int = 3,
    ) -> None:
        super().__init__()
        self.fc1 = layer(nn.Linear(5, 6))
        self.fc2 = nn.Linear(6, out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Normalised(MLP):
    """Inputs normalised by registered buffers; a frozen first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("scale", torch.rand(5) + 0.5)
        self.frozen = nn.Linear(5, 5).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.tanh(self.frozen((x - self.mean) * self.scale)))


class InPlace(nn.Module):
    """ReLU(inplace=True), a residual added in place, an in-place scale."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.tanh(self.fc0(x))
        h = self.fc2(self.relu(self.fc1(r)))
        h += r
        h.mul_(0.5)
        return self.head(torch.tanh(h))


class Checkpointed(MLP):
    """A part run by torch.utils.checkpoint: the output layer, the hidden one (on the data, which
    needs no gradient) or the whole network."""

    def __init__(self, reentrant: bool, part: str = "output") -> None:
        super().__init__()
        self.reentrant, self.part = reentrant, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part == "whole":
            return checkpoint(super().forward, x, use_reentrant=self.reentrant)
        if self.part == "hidden":
            h = checkpoint(lambda t: self.act(self.fc1(t)), x, use_reentrant=self.reentrant)
            return self.fc2(h)
        return checkpoint(self.fc2, self.act(self.fc1(x)), use_reentrant=self.reentrant)


class CheckpointedNorms(MLP):
    """A weight-normed layer and two BatchNorms by running statistics (one without affine
    parameters, another eps) in a non-reentrant checkpoint, which runs them again inside the
    backward passes: the analysis composes weight norm as its formula in there too (through a
    TorchFunctionMode, which is off inside autograd.grad, torch raised CheckpointError)."""

    def __init__(self, weight_norm: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__(weight_norm)
        self.bn1, self.bn2 = nn.BatchNorm1d(6, eps=1e-3, affine=False), nn.BatchNorm1d(6)
        with torch.no_grad():  # running statistics of a trained model
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            self.bn2.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(
            lambda t: torch.tanh(self.bn2(self.bn1(self.fc1(t)))), x, use_reentrant=False
        )
        return self.fc2(h)


class NormedCheckpoint(MLP):
    """A reentrant checkpoint of the first block on the data, normalised after: moving its
    weights all by one constant changes nothing a LayerNorm lets through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(lambda t: F.layer_norm(self.fc1(t), (6,)), x, use_reentrant=True)
        return self.fc2(torch.tanh(h))


class CrossEntropyOnce(torch.autograd.Function):
    """Cross-entropy whose backward is @once_differentiable: as the loss, its incoming gradient
    is a constant, and torch leaves no Error node for the check to find."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, z: torch.Tensor, y: torch.Tensor):
        ctx.save_for_backward(z, y)
        return F.cross_entropy(z, y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor):
        z, y = ctx.saved_tensors
        p = z.softmax(1)
        p[torch.arange(len(y)), y] -= 1
        return g * p / len(y), None


class AlwaysDropout(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.act(self.fc1(x)), 0.2))  # training=True by default


class NoGradFirst(nn.Module):
    """A first layer used under torch.no_grad (scriptable, unlike a checkpoint)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = torch.tanh(self.fc1(x))
        return self.fc2(h)


def old_weight_norm(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # deprecated for the parametrization, still in use
        warnings.simplefilter("ignore")
        return nn.utils.weight_norm(module)


@dataclass
class Arch:
    make: Callable[[], nn.Module]
    inputs: str  # tokens, padded, sequences, images, vectors
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    bn: str = "eval"


ARCHS = {
    "attention": Arch(Attention, "tokens"),
    "causal-sdpa": Arch(CausalAttention, "tokens"),
    "encoder-padded": Arch(Encoder, "padded"),
    "lstm": Arch(lambda: Recurrent(nn.LSTM), "sequences"),
    "gru": Arch(lambda: Recurrent(nn.GRU), "sequences"),
    "conv-bn-eval": Arch(Conv, "images"),
    "conv-bn-train": Arch(Conv, "images", bn="train"),
    "weight-norm": Arch(lambda: MLP(parametrizations.weight_norm), "vectors"),
    "weight-norm-hook": Arch(lambda: MLP(old_weight_norm), "vectors"),
    "spectral-norm": Arch(lambda: MLP(parametrizations.spectral_norm), "vectors"),
    "buffers-frozen": Arch(Normalised, "vectors"),
    "in-place": Arch(InPlace, "vectors"),
    "checkpoint": Arch(lambda: Checkpointed(reentrant=False, part="hidden"), "vectors"),
    "checkpointed-norms": Arch(lambda: CheckpointedNorms(parametrizations.weight_norm), "vectors"),
    "checkpointed-norms-hook": Arch(lambda: CheckpointedNorms(old_weight_norm), "vectors"),
    "custom-function": Arch(lambda: MLP(act=Softplus.apply), "vectors"),
    "mse": Arch(lambda: MLP(out=2), "targets", F.mse_loss),
}


def built(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, list]:
    """Architecture ``name`` and one batch, the same for every call."""
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = arch.make().to(dtype)
    g = torch.Generator().manual_seed(1)
    n = 8
    labels = torch.randint(0, 3, (n,), generator=g)
    if arch.inputs in ("tokens", "padded"):
        x = torch.randint(1, VOCAB, (n, TOKENS), generator=g)
        if arch.inputs == "padded":
            for i in range(n):
                x[i, TOKENS - i % 3 :] = 0
        return model, [(x, labels)]
    shape = {"sequences": (n, 5, 3), "images": (n, 1, 5, 5)}.get(arch.inputs, (n, 5))
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = torch.randn(n, 2, generator=g, dtype=dtype) if arch.inputs == "targets" else labels
    return model, [(x, y)]


def reference(
    model: nn.Module, loss_fn: Callable, batch: tuple, names: tuple[str, ...], bn: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Hessian (central differences of first-order gradients), gradient and loss, in float64."""
    x, y = batch
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and bn == "train":
            m.train()
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = [params[name] for name in names]

    def gradient() -> tuple[torch.Tensor, float]:
        loss = loss_fn(model(x), y)
        parts = torch.autograd.grad(loss, tensors, allow_unused=True)
        flat = [
            torch.zeros_like(t) if p is None else p for p, t in zip(parts, tensors, strict=True)
        ]
        return torch.cat([p.reshape(-1) for p in flat]), loss.item()

    columns, eps = [], 1e-6
    with torch.no_grad():
        for t in tensors:
            for j in range(t.numel()):
                value = t.view(-1)[j].item()
                t.view(-1)[j] = value + eps
                with torch.enable_grad():
                    up = gradient()[0]
                t.view(-1)[j] = value - eps
                with torch.enable_grad():
                    down = gradient()[0]
                t.view(-1)[j] = value
                columns.append((up - down) / (2 * eps))
    g, loss = gradient()
    model.load_state_dict(state)
    H = torch.stack(columns, 1)
    return (H + H.T) / 2, g, loss


_REFERENCES: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}


def reference_of(name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The reference of architecture ``name``, computed once per session."""
    if name not in _REFERENCES:
        model, batches = built(name)
        names = HessianOperator(model, ARCHS[name].loss, batches).space.names
        _REFERENCES[name] = reference(model, ARCHS[name].loss, batches[0], names, ARCHS[name].bn)
    return _REFERENCES[name]


@pytest.mark.parametrize("backend", ["double-backward", "func"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_products_equal_the_finite_difference_hessian(name, backend):
    H = reference_of(name)[0]
    model, batches = built(name)
    op = HessianOperator(model, ARCHS[name].loss, batches, bn=ARCHS[name].bn, backend=backend)
    V = torch.randn(8, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scale = float(torch.linalg.matrix_norm(H, 2))
    for block in (V[:1], V):  # one vector, and a block
        torch.testing.assert_close(op.matmul(block), block @ H, rtol=0, atol=1e-6 * scale)
    assert op.backends_used


@pytest.mark.parametrize("name", list(ARCHS))
def test_eigenpairs_and_alignment_equal_the_reference(name):
    H, g, loss = reference_of(name)
    model, batches = built(name)
    op = HessianOperator(model, ARCHS[name].loss, batches, bn=ARCHS[name].bn)
    top = eigenpairs(op, k=3, tol=1e-7)
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    assert bool(top.converged.all())
    torch.testing.assert_close(top.eigenvalues, exact, rtol=0, atol=1e-6 * float(exact[0]))
    scores = alignment_scores(op, top.eigenvalues, top.eigenvectors, minibatches=1)
    g_hat = g / g.norm()
    assert scores.loss == pytest.approx(loss, rel=1e-12)
    assert scores.curvature_ratio == pytest.approx(float(g_hat @ H @ g_hat / exact[0]), rel=1e-5)


def test_a_float32_model_is_its_float64_twin_to_float32_rounding():
    model, batches = built("attention", torch.float32)
    H = reference_of("attention")[0]
    V = torch.randn(8, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for backend in ("double-backward", "func"):
        op = HessianOperator(model, F.cross_entropy, batches, backend=backend)
        HV = op.matmul(V.float()).double()
        assert float((HV - V @ H).norm() / (V @ H).norm()) < 1e-5


def test_the_loss_at_a_shifted_point_is_of_the_function_differentiated():
    """A padding mask sends a loss computed without autograd down the attention fast path, which
    gives padded positions 0: the sharpness L(w + rho g) - L(w) was of two functions (-0.06
    where it is +0.05)."""
    model, batches = built("encoder-padded")
    op = HessianOperator(model, F.cross_entropy, batches)
    loss, g = op.gradient()
    assert op.loss() == pytest.approx(loss, rel=1e-12)
    w, delta = op.space.values(), 0.05 * g / g.norm()
    op.space.copy_(w + delta)
    model.eval()  # its dropout off, as in the analysis
    shifted = F.cross_entropy(model(batches[0][0]), batches[0][1]).item()  # with autograd
    op.space.copy_(w)
    assert op.loss_at(delta) == pytest.approx(shifted, rel=1e-10)


def test_recurrent_layers_run_without_cudnn_in_the_analysis():
    """cuDNN's RNN backward runs only in training mode and has no derivative itself: on CUDA a
    product of an LSTM in eval mode failed; the native kernels have both."""
    model, batches = built("lstm")
    op = HessianOperator(model, F.cross_entropy, batches)
    before = torch.backends.cudnn.enabled
    op.matmul(torch.ones(op.n, dtype=torch.float64))
    assert model.cudnn_seen and not any(model.cudnn_seen)
    assert torch.backends.cudnn.enabled == before


@pytest.mark.parametrize("backend", ["double-backward", "func", "auto"])
def test_a_compiled_model_is_analysed_as_its_eager_self(backend):
    """AOTAutograd's compiled backward (torch.compile's default, and backend="aot_eager") cannot
    be differentiated again: every double-backward product failed in torch's words ("does not
    currently support double backward"; once trained, "donated buffers"), the CLI's an
    "unexpected RuntimeError". Compiled code runs eagerly in the analysis."""
    H = reference_of("mse")[0]
    model, batches = built("mse")
    compiled = torch.compile(model, backend="aot_eager")
    x, y = batches[0]
    F.mse_loss(compiled(x), y).backward()  # trained with it, as a model to analyse was
    compiled.zero_grad()
    op = HessianOperator(compiled, F.mse_loss, batches, backend=backend)
    V = torch.randn(3, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scale = float(torch.linalg.matrix_norm(H, 2))
    for block in (V[:1], V):
        torch.testing.assert_close(op.matmul(block), block @ H, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("backend", ["double-backward", "func"])
def test_the_hessian_is_of_the_loss_whatever_backward_hooks_do_to_gradients(backend):
    """A parameter's gradient hook (clipping, scaling) and a module's backward hooks change the
    gradients of training, not the loss: the products differentiated the changed gradient
    (lambda_1 0.56 for 0.78 with a hook halving one layer's gradient, certified converged), and
    func's, which skip tensor hooks, were of another matrix. They are off in the analysis and
    as they were after it."""
    H = reference_of("mse")[0]
    model, batches = built("mse")
    fired: list[str] = []
    model.fc1.weight.register_hook(lambda g: (fired.append("tensor"), g * 0.5)[1])
    model.fc2.register_full_backward_pre_hook(lambda m, go: (fired.append("pre"), (2 * go[0],))[1])
    model.fc2.register_full_backward_hook(lambda m, gi, go: fired.append("full"))
    op = HessianOperator(model, F.mse_loss, batches, backend=backend)
    V = torch.randn(3, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scale = float(torch.linalg.matrix_norm(H, 2))
    for block in (V[:1], V):
        torch.testing.assert_close(op.matmul(block), block @ H, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(op.gradient()[1], reference_of("mse")[1], rtol=0, atol=1e-10)
    assert not fired
    F.mse_loss(model(batches[0][0]), batches[0][1]).backward()  # the model's own hooks, back
    assert sorted(set(fired)) == ["full", "pre", "tensor"]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: MLP(act=SoftplusOnce.apply), "@once_differentiable, so torch cannot give"),
        (lambda: Checkpointed(reentrant=True), "call it with use_reentrant=False"),
        (
            lambda: Checkpointed(reentrant=True, part="hidden"),
            "the loss changes with fc1.weight, but autograd gives it no gradient",
        ),
        (lambda: Checkpointed(reentrant=True, part="whole"), "changes with fc1.weight, but"),
        (AlwaysDropout, "draws random numbers in eval mode"),
        # A scripted model was not looked at: its first layer's rows and columns were zero.
        (lambda: torch.jit.script(NoGradFirst()), "changes with fc1.weight, but autograd"),
    ],
    ids=[
        "once-differentiable",
        "reentrant-checkpoint",
        "reentrant-on-data",
        "reentrant-everything",
        "dropout-always-on",
        "scripted-no-grad",
    ],
)
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["double-backward", "func"])
def test_a_model_without_a_sound_hessian_is_refused_in_one_sentence(make, message, backend):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(8, 5, dtype=torch.float64)
    op = HessianOperator(model, F.cross_entropy, [(x, torch.arange(8) % 3)], backend=backend)
    with pytest.raises(UserError, match=message):
        op.matmul(torch.ones(op.n, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["double-backward", "func"])
@pytest.mark.parametrize("name", ["attention", "encoder-padded", "lstm", "gru", "weight-norm"])
def test_on_cuda_the_products_equal_the_finite_difference_hessian(name, backend):
    """Where the fused kernels are CUDA's own (flash attention, cuDNN RNNs, whose backward runs
    only in training mode): the analysis's kernels give the CPU reference's Hessian there too."""
    H = reference_of(name)[0].cuda()
    model, batches = built(name)
    batches = [(x.cuda(), y.cuda()) for x, y in batches]
    op = HessianOperator(
        model.cuda(), ARCHS[name].loss, batches, bn=ARCHS[name].bn, backend=backend
    )
    V = torch.randn(8, op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scale = float(torch.linalg.matrix_norm(H, 2))
    torch.testing.assert_close(op.matmul(V.cuda()), V.cuda() @ H, rtol=0, atol=1e-6 * scale)
    assert torch.backends.cudnn.enabled  # given back after the analysis


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize(
    ("dtype", "precision", "make", "loss", "message"),
    [
        # The uniform shift the check first made left a LayerNorm's input as it was.
        (torch.float64, "full", NormedCheckpoint, F.cross_entropy, "changes with fc1.weight"),
        # Compared within the square root of a 16-bit dtype's rounding (3-9% of the loss), the
        # change passed; within a few float32 roundings, of the outputs in float32, it does not
        # (a 16-bit model's, before 16-bit parameters were refused; now bfloat16 autocast's).
        (torch.float32, "bf16", lambda: Checkpointed(True, "hidden"), F.cross_entropy, "changes"),
        # The curvature of a @once_differentiable loss was dropped (its Hessian 0), unsaid.
        (torch.float64, "full", MLP, CrossEntropyOnce.apply, "@once_differentiable, so torch"),
    ],
    ids=["layernorm-after-reentrant", "bf16-autocast-reentrant", "loss-once"],
)
def test_the_review_s_unsound_models_are_refused(dtype, precision, make, loss, message):
    torch.manual_seed(0)
    model = make().to(dtype)
    x = torch.randn(8, 5, dtype=dtype)
    op = HessianOperator(model, loss, [(x, torch.arange(8) % 3)], precision=precision)
    with pytest.raises(UserError, match=message):
        op.check_model()
