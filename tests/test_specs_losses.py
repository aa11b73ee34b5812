"""Loss specs: cross-entropy, mean squared error (with one-hot labels) and user code."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from cli_runner import one_sentence, run
from torch.nn import functional as F

from hessian_cli.errors import UserError
from hessian_cli.specs import check_targets, default_loss, get_loss


def test_default_loss() -> None:
    assert default_loss(10) == "ce"
    assert default_loss(None) == "mse"


def test_cross_entropy_is_the_batch_mean() -> None:
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1, 0])
    loss = get_loss("ce")(logits, labels)
    manual = -torch.log_softmax(logits, 1)[torch.arange(5), labels].mean()
    assert torch.allclose(loss, manual)
    # Labels of any integer dtype (a library caller's int32 ones were torch's RuntimeError).
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.allclose(get_loss("ce")(logits, labels.to(dtype)), manual)


def test_cross_entropy_takes_labels_and_probabilities_but_not_regression_targets() -> None:
    """torch takes any real rows as soft labels: regression targets gave a negative loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g)
    soft = torch.softmax(torch.randn(6, 3, generator=g), 1)  # label smoothing, mixup
    per_position = torch.softmax(torch.randn(6, 3, 5, generator=g), 1)  # [B, C, L]: along dim 1
    check_targets(
        "ce",
        [
            (x, torch.tensor([0, 2, 1, 1, 0, 2])),
            (x, soft),
            (x, F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2])).float()),
            (x, per_position),
            (x, torch.tensor([[0.9, 0.05, 0.05]] * 6).bfloat16()),  # sums to 0.9985 in bf16
            (x, torch.tensor([[0.9, 0.05, 0.05]] * 6).bfloat16().float()),  # as analyze has it
        ],
        None,  # real targets make data without classes, as the data loaders say
    )
    with pytest.raises(UserError, match="label 5 is out of range for 3 classes"):  # check_labels
        check_targets("ce", [(x, torch.tensor([0, 2, 1, 1, 0, 5]))], 3)
    real = torch.randn(6, 3, generator=g)
    assert float(get_loss("ce")(torch.randn(6, 3, generator=g), real)) != 0  # torch computes it
    zeros, five = torch.zeros(6, 1000).bfloat16(), torch.full((6, 1000), 0.005).bfloat16()
    for targets in (real, real.abs(), real[:, 0], zeros, five):
        with pytest.raises(UserError, match="cross-entropy needs class labels or class prob"):
            check_targets("ce", [(x, targets)], None)
    # A language model's soft labels, classes last: probabilities, though not along dim 1.
    with pytest.raises(UserError, match="probabilities along dimension 1 .* along their last"):
        check_targets("ce", [(x, per_position.transpose(1, 2))], None)
    check_targets("mse", [(x, real)], None)


def test_mse_one_hot_for_integer_labels() -> None:
    outputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 1, 2])
    loss = get_loss("mse", num_classes=3)(outputs, labels)
    one_hot = torch.eye(3)[labels]
    assert torch.allclose(loss, ((outputs - one_hot) ** 2).mean())
    # Without a class count the output width is used.
    assert torch.allclose(get_loss("mse")(outputs, labels), loss)
    with pytest.raises(UserError, match="out of range"):
        get_loss("mse", num_classes=3)(outputs, torch.tensor([3, 0, 0, 0]))
    # Integer one-hot rows are those vectors already (they were one-hot again: "targets (4, 3, 2)").
    assert torch.allclose(get_loss("mse", num_classes=2)(outputs, one_hot.long()), loss)


def test_mse_one_hot_is_over_the_outputs_classes_where_they_are() -> None:
    """A model with more outputs than the data's top label (10 for labels 0 to 8) was refused
    as a shape mismatch; per-position labels against (batch, classes, ...) outputs had their
    one-hot vectors (classes last) reshaped into the outputs' layout: a loss of 1.465 for 1.361."""
    g = torch.Generator().manual_seed(0)
    outputs, labels = torch.randn(4, 5, generator=g), torch.tensor([2, 0, 1, 2])
    assert torch.allclose(
        get_loss("mse", num_classes=3)(outputs, labels), F.mse_loss(outputs, torch.eye(5)[labels])
    )
    for shape in ((2, 3, 4, 5), (2, 3, 7), (2, 7, 3)):  # classes second, second, last
        outputs = torch.randn(shape, generator=g)
        last = shape[-1] == 3 and shape[1] != 3
        labels = torch.randint(0, 3, shape[:-1] if last else shape[:1] + shape[2:], generator=g)
        one_hot = F.one_hot(labels, 3).float()
        expected = F.mse_loss(outputs, one_hot if last else one_hot.movedim(-1, 1))
        assert torch.allclose(get_loss("mse", num_classes=3)(outputs, labels), expected), shape


def test_mse_refuses_a_layout_it_cannot_tell_or_that_a_reshape_gets_wrong() -> None:
    """Labels per token against as many tokens as classes took the classes last, unsaid (a loss
    of 0.890 where they are second is 1.135; cross-entropy refuses it); real targets whose
    sizes are the outputs' in another order were reshaped into them: 1.816 for 1.697."""
    g = torch.Generator().manual_seed(0)
    mse = get_loss("mse", num_classes=4)
    with pytest.raises(UserError, match="^the mse loss cannot tell where the classes are"):
        mse(torch.randn(2, 4, 4, generator=g), torch.randint(0, 4, (2, 4), generator=g))
    outputs, targets = torch.randn(2, 3, 5, generator=g), torch.randn(2, 5, 3, generator=g)
    with pytest.raises(UserError, match=r"\(2, 5, 3\) \(the same sizes in another order"):
        get_loss("mse")(outputs, targets)
    # Dimensions of one moved, or sizes flattened, are the same values in the same order.
    for shape in ((2, 3, 5, 1), (2, 1, 3, 5), (2, 15)):
        flat = targets.transpose(1, 2).reshape(shape)
        assert torch.equal(get_loss("mse")(outputs, flat), F.mse_loss(outputs, flat.view(2, 3, 5)))


def test_mse_of_one_output_regresses_onto_0_1_labels() -> None:
    """A binary classifier's one output against 0/1 labels (as a tensor file holds them) was
    refused: "label 1 is out of range for 1 classes"; it is the regression onto them."""
    from hessian_cli.specs import check_fits

    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    model = torch.nn.Linear(3, 1)
    mse = get_loss("mse", num_classes=2)
    check_fits(model, mse, [(x, labels)])
    assert torch.equal(mse(model(x), labels), F.mse_loss(model(x)[:, 0], labels.float()))
    mask, masks = torch.randn(2, 1, 4, 4, generator=g), torch.randint(0, 2, (2, 4, 4), generator=g)
    assert torch.equal(mse(mask, masks), F.mse_loss(mask, masks[:, None].float()))
    with pytest.raises(
        UserError,
        match="out of range for a single output in the mse loss, which takes 0/1 labels only",
    ):
        mse(model(x), labels * 2)
    # One output per sample flat, (batch,), is the same model: labels 0 to 2 were regressed
    # onto as numbers there, where (batch, 1) refused them.
    assert torch.equal(mse(model(x)[:, 0], labels), mse(model(x), labels))
    with pytest.raises(
        UserError,
        match="out of range for a single output in the mse loss, which takes 0/1 labels only",
    ):
        mse(model(x)[:, 0], labels * 2)
    # A mask shaped like the outputs, (batch, H, W), or labels shaped (batch, 1) as the one
    # output is: labels 0 to 2 there were regressed onto as numbers (a mask of 0 to 4: 7.84).
    assert torch.equal(mse(mask[:, 0], masks), F.mse_loss(mask[:, 0], masks.float()))
    for outputs, targets in ((mask[:, 0], masks * 2), (model(x), labels[:, None] * 2)):
        with pytest.raises(UserError, match="label 2 is out of range for integer targets shaped"):
            mse(outputs, targets)


def test_mse_refuses_a_negative_label_by_its_value() -> None:
    """A negative label made a row of zeros (one-hot by comparison matches no class), and
    against one output the refusal named label 1, which is in range."""
    mse = get_loss("mse", num_classes=3)
    with pytest.raises(UserError, match="^label -1 is out of range for 3 classes in the mse"):
        mse(torch.randn(4, 3), torch.tensor([0, 1, -1, 2]))
    with pytest.raises(UserError, match="^label -1 is out of range for a single output"):
        get_loss("mse")(torch.randn(4, 1), torch.tensor([0, -1, 1, 0]))


def test_mse_real_targets() -> None:
    outputs = torch.randn(4, 1, dtype=torch.float64)
    targets = torch.randn(4)  # one target per sample, flat: reshaped, not broadcast
    loss = get_loss("mse")(outputs, targets)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, ((outputs[:, 0] - targets.double()) ** 2).mean())
    with pytest.raises(UserError, match="shaped like the model outputs"):
        get_loss("mse")(torch.randn(4, 2), torch.randn(4, 3))


def test_mse_keeps_real_targets_beside_16_bit_outputs() -> None:
    """The engine hands a bfloat16 model float32 targets (never narrowed), and the built-in mse
    narrowed them: a target of 1234.5 became 1232, and a loss of 6.25 was 0."""
    w = torch.ones(1, 1, dtype=torch.bfloat16, requires_grad=True)
    outputs = torch.full((4, 1), 1232.0, dtype=torch.bfloat16) * w
    loss = get_loss("mse")(outputs, torch.full((4, 1), 1234.5))
    assert float(loss.detach()) == 2.5**2
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), w)
    assert float(h) == pytest.approx(2 * 1232.0**2, rel=1e-2)


def test_losses_are_twice_differentiable() -> None:
    w = torch.randn(3, 2, requires_grad=True)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    for spec in ("ce", "mse"):
        (g,) = torch.autograd.grad(get_loss(spec, num_classes=2)(x @ w, y), w, create_graph=True)
        (hv,) = torch.autograd.grad((g * torch.ones_like(g)).sum(), w)
        assert hv.abs().sum() > 0


def test_user_loss_from_file(tmp_path: Path) -> None:
    path = tmp_path / "my_loss.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            def l1(outputs, targets):
                return (outputs - targets).abs().mean()
            NOT_CALLABLE = 3
            """
        )
    )
    loss = get_loss(f"{path}:l1")
    assert float(loss(torch.ones(2, 2), torch.zeros(2, 2))) == 1.0
    with pytest.raises(UserError, match="not callable"):
        get_loss(f"{path}:NOT_CALLABLE")
    with pytest.raises(UserError, match="no attribute"):
        get_loss(f"{path}:l2")


def test_user_loss_from_module_function_and_class() -> None:
    logits, labels = torch.randn(3, 4), torch.tensor([0, 3, 1])
    expected = F.cross_entropy(logits, labels)
    assert torch.allclose(get_loss("torch.nn.functional:cross_entropy")(logits, labels), expected)
    assert torch.allclose(get_loss("torch.nn:CrossEntropyLoss")(logits, labels), expected)


def test_torch_binary_cross_entropy_takes_0_1_labels_as_a_binary_classifier_has_them() -> None:
    """--loss torch.nn:BCEWithLogitsLoss (and BCELoss, and their functions) on a one-output model
    with integer 0/1 labels of shape (batch,) met torch's "Target size (torch.Size([4])) must be
    the same as input size (torch.Size([4, 1]))", then its refusal of integer targets."""
    from hessian_cli.engine.model_mode import loss_module

    torch.manual_seed(0)
    logits, labels = torch.randn(4, 1), torch.tensor([0, 1, 1, 0])
    with_logits = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    on_probabilities = F.binary_cross_entropy(logits.sigmoid()[:, 0], labels.float())
    for spec, out, expected in (
        ("torch.nn:BCEWithLogitsLoss", logits, with_logits),
        ("torch.nn.functional:binary_cross_entropy_with_logits", logits, with_logits),
        ("torch.nn:BCELoss", logits.sigmoid(), on_probabilities),
        ("torch.nn.functional:binary_cross_entropy", logits.sigmoid(), on_probabilities),
    ):
        loss = get_loss(spec)
        assert torch.allclose(loss(out, labels), expected), spec
        assert torch.allclose(loss(out[:, 0], labels), expected), spec  # (batch,) outputs
        assert torch.allclose(loss(out, labels[:, None].float()), expected), spec  # as torch's
        with pytest.raises(UserError, match="^label 2 is out of range for binary cross-entropy"):
            loss(out, torch.tensor([0, 2, 1, 0]))
    # A mask per pixel against one channel, (batch, 1, H, W).
    pixels, mask = torch.randn(2, 1, 3, 3), torch.randint(0, 2, (2, 3, 3))
    expected = F.binary_cross_entropy_with_logits(pixels[:, 0], mask.float())
    assert torch.allclose(get_loss("torch.nn:BCEWithLogitsLoss")(pixels, mask), expected)
    assert isinstance(loss_module(get_loss("torch.nn:BCELoss")), torch.nn.BCELoss)


def test_unknown_loss() -> None:
    with pytest.raises(UserError, match="unknown loss 'hinge'.*ce or mse"):
        get_loss("hinge")
    with pytest.raises(UserError, match="cannot import module"):
        get_loss("no_such_pkg_xyz.losses:f")


def test_the_fit_check_runs_the_model_where_it_is():
    """analyze moves the model to --device before the check, the data stays on the CPU until the
    products: a model elsewhere (CUDA; here the meta device, which computes only shapes) was
    reported as not fitting its data."""
    from hessian_cli.specs import check_fits

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))]
    check_fits(model.to("meta"), F.cross_entropy, batches)


def test_a_loss_of_one_value_in_a_tensor_of_shape_1_is_refused_by_the_fit_check():
    """Its shape (1,) (loss.reshape(1), F.mse_loss(...).unsqueeze(0)) passed the check and was
    refused only at the first product, after the work before it."""
    from hessian_cli.specs import check_fits

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))]
    for shape in ((1,), (1, 1)):
        with pytest.raises(
            UserError, match=rf"shape {re.escape(str(shape))} .*: return loss\.squeeze\(\)\.$"
        ):
            check_fits(model, lambda out, y, s=shape: F.cross_entropy(out, y).reshape(s), batches)


def test_a_loss_that_sums_over_the_batch_is_refused_and_means_pass():
    """A sum makes every eigenvalue the batch size times larger: it was taken without a word."""
    from hessian_cli.specs import check_fits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))]
    with pytest.raises(UserError, match="the loss sums over the batch"):
        check_fits(model, lambda out, y: F.cross_entropy(out, y, reduction="sum"), batches)
    with pytest.raises(UserError, match="the loss sums over the batch"):
        check_fits(model, lambda out, y: ((out - 1) ** 2).sum(), batches)
    check_fits(model, F.cross_entropy, batches)
    check_fits(model, lambda out, y: ((out - 1) ** 2).mean(), batches)
    check_fits(model, lambda out, y: ((out - 1) ** 2).sum(1).mean(), batches)  # over outputs
    # A loss that cannot take one sample (it needs the batch's spread) is not judged.
    check_fits(model, lambda out, y: F.cross_entropy(out, y) + out[:, 0].std() * 0, batches)


def test_the_fit_check_takes_one_output_for_no_class_count():
    """A binary classifier's one logit with 0/1 labels, for the binary cross-entropy it is
    made for, was refused: "class labels up to 1, but the model has only 1 outputs"; ce says
    why it cannot take one output, in its own words."""
    from hessian_cli.specs import check_fits

    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
    check_fits(model, lambda o, y: F.binary_cross_entropy_with_logits(o[:, 0], y.float()), batches)
    with pytest.raises(UserError, match="^cross-entropy over a single output is 0"):
        check_fits(model, get_loss("ce"), batches)
    # One output per sample, squeezed: torch's "Dimension out of range".
    with pytest.raises(UserError, match="^cross-entropy over a single output is 0"):
        check_fits(torch.nn.Sequential(model, torch.nn.Flatten(0)), get_loss("ce"), batches)
    with pytest.raises(UserError, match="labels up to 2, but the model has only 1 outputs"):
        check_fits(model, get_loss("ce"), [(torch.randn(2, 3), torch.tensor([2, 0]))])
    with pytest.raises(UserError, match="labels up to 2, but the model has only 2 outputs"):
        check_fits(
            torch.nn.Linear(3, 2), get_loss("ce"), [(torch.randn(2, 3), torch.tensor([2, 0]))]
        )


def test_class_labels_stored_as_floats_get_their_fix_from_cross_entropy():
    labels = torch.tensor([[0.0], [3.0], [1.0]])
    with pytest.raises(UserError, match="store class labels as integers, or give --loss mse"):
        check_targets("ce", [(torch.zeros(3, 2), labels)], None)
    with pytest.raises(UserError, match="not probabilities: give --loss mse for regression"):
        check_targets("ce", [(torch.zeros(3, 2), labels + 0.5)], None)


def test_mse_on_class_labels_stored_as_floats_says_so():
    """A language model's next tokens stored as floats met only a shape mismatch."""
    mse = get_loss("mse", num_classes=None)
    logits, labels = torch.randn(2, 5, 7), torch.tensor([[1.0, 2, 3, 4, 5]] * 2)
    with pytest.raises(UserError, match="class labels stored as real numbers"):
        mse(logits, labels)
    # One per sample, as a tensor file's real y is read (batch, 1): the mismatch alone.
    with pytest.raises(UserError, match=r"\(2, 1\) \(whole numbers, one per sample or token: cl"):
        mse(logits[:, 0], labels[:, :1])
    with pytest.raises(UserError) as info:  # real targets are a shape mismatch only
        mse(logits, labels + 0.5)
    assert "class labels" not in str(info.value)


def test_cross_entropy_refuses_integer_one_hot_labels():
    """Integer one-hot rows (a factory's y of shape (N, C), int64) met torch's 'Expected
    floating point type for target with class probabilities, got Long'."""
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    one_hot = F.one_hot(torch.tensor([0, 2, 1, 1]), 3)
    with pytest.raises(
        UserError, match=r"\(3,\) per sample for outputs of \(3,\): .*y.argmax\(1\)"
    ):
        get_loss("ce")(logits, one_hot)
    # Multi-hot rows or integer regression targets: argmax kept one label of each row, or none.
    for targets in (torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 0]]), one_hot * 7):
        with pytest.raises(UserError, match=": give --loss mse, .* not one-hot rows") as info:
            get_loss("ce")(logits, targets)
        assert "argmax" not in str(info.value)
        assert str(info.value).count(":") == 1  # one sentence, one colon (it had two)
    assert torch.allclose(
        get_loss("ce")(logits, one_hot.float()), F.cross_entropy(logits, one_hot.argmax(1))
    )


def test_the_fit_check_runs_a_loss_module_in_eval_mode():
    """A loss module with a dropout ran in training mode: the check drew random numbers before
    the first step, where its docstring says no RNG is touched; each part keeps its mode."""
    from hessian_cli.specs import check_fits

    class DroppedCE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.drop(out), y)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2))
    model[2].eval()  # a part the user keeps in eval mode
    loss, batches = DroppedCE(), [(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))]
    before = torch.get_rng_state()
    check_fits(model, loss, batches)
    assert torch.equal(torch.get_rng_state(), before)
    assert [m.training for m in (*model, loss, loss.drop)] == [True, True, False, True, True]


def test_mse_reads_integer_targets_once_not_at_every_call() -> None:
    """The products call the loss on one batch's targets at every product: mse read their
    labels from the device (max, 0/1) at each call, a wait for the GPU's work each time (a
    read of a scalar is aten::_local_scalar_dense on the CPU). Targets changed in place are
    read again."""
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(6, 4, generator=g)
    cases = [
        (outputs, torch.randint(0, 4, (6,), generator=g)),  # one-hot over the classes
        (outputs[:, :1], torch.randint(0, 2, (6,), generator=g)),  # a single output's 0/1
        (outputs, torch.randint(0, 2, (6, 4), generator=g)),  # multi-hot rows as they are
    ]
    for out, labels in cases:
        mse = get_loss("mse")

        def reads(calls: int, out=out, labels=labels, mse=mse) -> int:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                losses = [mse(out, labels) for _ in range(calls)]
            assert all(torch.equal(loss, losses[0]) for loss in losses)
            return sum(e.name == "aten::_local_scalar_dense" for e in prof.events())

        assert reads(1) > 0 and reads(5) == 0, labels.shape
    labels = torch.tensor([0, 1, 2, 3])
    mse = get_loss("mse")
    assert torch.equal(mse(outputs[:4], labels), F.mse_loss(outputs[:4], torch.eye(4)[labels]))
    labels[0] = 4
    with pytest.raises(UserError, match="^label 4 is out of range for 4 classes in the mse loss"):
        mse(outputs[:4], labels)


def test_torch_binary_cross_entropy_reads_integer_labels_once() -> None:
    """As mse's: torch's binary cross-entropy on 0/1 integer labels looked for other labels on
    the device at every call (a wait for the GPU's work each product)."""
    logits, labels = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    loss = get_loss("torch.nn:BCEWithLogitsLoss")

    def reads(calls: int) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            losses = [loss(logits, labels) for _ in range(calls)]
        assert all(torch.equal(value, losses[0]) for value in losses)
        # (a nonzero's size, which indexing by a mask needs, is a read too)
        waits = ("aten::_local_scalar_dense", "aten::nonzero")
        return sum(e.name in waits for e in prof.events())

    assert reads(1) > 0 and reads(5) == 0
    labels[2] = -1
    with pytest.raises(UserError, match="^label -1 is out of range for binary cross-entropy"):
        loss(logits, labels)


def test_mse_takes_labels_made_in_inference_mode() -> None:
    """A dataset built under torch.inference_mode() holds tensors that keep no version counter:
    the range read once per version met torch's 'Inference tensors do not track version
    counter' at the first loss."""
    outputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        labels = torch.tensor([0, 2, 1, 2])
    mse = get_loss("mse")
    expected = F.mse_loss(outputs, torch.eye(3)[labels.clone()])
    assert torch.equal(mse(outputs, labels), expected)
    with torch.inference_mode():
        labels[0] = 3
    with pytest.raises(UserError, match="^label 3 is out of range for 3 classes in the mse loss"):
        mse(outputs, labels)


def test_a_label_past_the_outputs_in_an_alignment_minibatch_is_one_sentence(capsys, tmp_path):
    """The fit check reads the analysed batches; a minibatch of the alignment's past them held
    digit 9 for a 7-class model: "unexpected IndexError: Target 9 is out of bounds"."""
    from hessian_cli.specs import build_model

    ckpt = tmp_path / "mlp7.pt"
    torch.save(build_model("mlp", input_shape=(1, 8, 8), num_classes=7).state_dict(), ckpt)
    code, _, err = run(
        capsys, "analyze", ckpt, "--model", "mlp", "--model-kwargs", '{"num_classes": 7}',
        "--data", "digits", "--batch-size", "9", "--num-samples", "9", "--alignment",
        "--top-k", "1",
    )  # fmt: skip
    assert code == 2 and one_sentence(err, strict=True) == (
        "error: the data has class labels up to 9, but the model has only 7 outputs: check the "
        "data and the model's num_classes."
    )
