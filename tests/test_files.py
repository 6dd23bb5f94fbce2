"""files.py's readers take no file at its word: whatever a file claims beyond what it holds (a tensor's shape, a
compressed entry, a pickle, a header, a config's sizes) is refused in one line naming the file, before anything of
that size is built; so is a pipe or a device where a file belongs. Each file here is forged the way a hostile one
would be, at a size that is harmless if a check is missing (the test then fails, it does not exhaust memory)."""
import json
import os
import threading
import zipfile

import pytest
import torch

import axf
import checkpoints
import clip
import config
import files
import metrics
import train


def refused(call, *args, match="", **kwargs):
    """The one-line ValueError that call(*args) raises; it must contain `match`."""
    with pytest.raises(ValueError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert match in message and "\n" not in message, message
    assert "weights_only" not in message and "Re-running" not in message, message  # never torch's advice
    return message


def never_called(monkeypatch, owner, name):
    """Make owner.name fail the test if anything calls it: the refusal must come first."""
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called")
    monkeypatch.setattr(owner, name, fail)


# ----------------------------------------------------------------------------- tensors that claim more than they hold


def test_a_view_that_repeats_one_number_is_refused_naming_file_and_tensor(tmp_path):
    """torch.save stores torch.zeros(1).expand(N, 64) in a few bytes; built from its shape it would be N x 64."""
    path = tmp_path / "text.ckpt"
    torch.save({"state_dict": {"token_embedding.weight": torch.zeros(1).expand(100_000, 64)}}, path)
    message = refused(files.read_torch, path, match=f"{path}: tensor state_dict.token_embedding.weight claims shape "
                                                    f"[100000, 64] (25,600,000 bytes) but holds 4 bytes")
    assert "not a weights file" in message


def test_views_of_the_same_bytes_over_and_over_are_refused_but_tied_weights_load(tmp_path):
    shared = torch.zeros(1000)
    torch.save({f"layer{i}.weight": shared.view(10, 100) for i in range(400)}, tmp_path / "views.pt")
    refused(files.read_torch, tmp_path / "views.pt", match="its tensors claim 1,600,000 bytes but it stores 4,000")
    torch.save({"embedding.weight": shared, "head.weight": shared}, tmp_path / "tied.pt")  # two names, one tensor
    assert files.read_torch(tmp_path / "tied.pt")["head.weight"].shape == (1000,)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's notes on sparse tensors' invariant checks
@pytest.mark.parametrize("tensor, what", [
    (torch.empty(10 ** 9, device="meta"), "has no data (a meta tensor)"),
    (torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0), (10 ** 9,), check_invariants=False),
     "is torch.sparse_coo"),
])
def test_a_tensor_without_numbers_of_its_own_is_refused(tmp_path, tensor, what):
    torch.save({"w": tensor}, tmp_path / "x.pt")
    refused(files.read_torch, tmp_path / "x.pt", match=f"x.pt: tensor w {what}")


def test_containers_nested_without_end_or_repeated_into_a_bomb_are_refused(tmp_path):
    """The unpickler builds them from a few bytes; walking them (or printing them) would never end."""
    cycle = []
    cycle.append(cycle)
    bomb = [torch.zeros(1)]
    for _ in range(25):  # 2^25 items, 26 lists
        bomb = [bomb, bomb]
    for name, obj, what in (("cycle", cycle, "containers nested more than 64 deep"),
                            ("bomb", {"model": bomb}, "containers that repeat one another into")):
        torch.save(obj, tmp_path / f"{name}.pt")
        refused(files.read_torch, tmp_path / f"{name}.pt", match=f"{name}.pt: {what}")


class Inflating:
    """Pickles torch's own _rebuild_device_tensor_from_cpu_tensor, which a weights-only load allows: its dtype
    conversion copies a stride-0 view out to its full shape inside torch.load, before any check could run."""

    def __reduce__(self):
        return torch._utils._rebuild_device_tensor_from_cpu_tensor, (torch.zeros(1).expand(10 ** 6), torch.float64,
                                                                     "cpu", False)


@pytest.mark.parametrize("obj, name", [({"x": bytearray(16)}, "__builtin__.bytearray"),
                                       ({"x": Inflating()}, "torch._utils._rebuild_device_tensor_from_cpu_tensor")])
@pytest.mark.parametrize("zipped", [True, False])
def test_pickles_that_build_memory_from_nothing_are_refused_unread(tmp_path, monkeypatch, obj, name, zipped):
    path = tmp_path / "x.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    never_called(monkeypatch, torch, "load")
    refused(files.read_torch, path, match=f"{path}: pickles {name}, which a weights file does not hold")


def test_a_zip_entry_that_inflates_in_memory_is_refused(tmp_path, monkeypatch):
    """torch.save stores its entries as they are; deflated, 20 MB of zeros take 20 kB."""
    torch.save({"w": torch.zeros(5 * 2 ** 20)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as plain, zipfile.ZipFile(tmp_path / "x.pt", "w") as forged:
        for entry in plain.infolist():
            forged.writestr(entry.filename, plain.read(entry), compress_type=zipfile.ZIP_DEFLATED)
    never_called(monkeypatch, torch, "load")
    message = refused(files.read_torch, tmp_path / "x.pt", match="x.pt: a PyTorch checkpoint whose entries unpack to")
    assert os.path.getsize(tmp_path / "x.pt") < 100_000, message


def test_an_empty_file_is_named(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"")
    refused(files.read_torch, tmp_path / "x.pt", match="x.pt: an empty file (0 bytes")


# ----------------------------------------------------------------------------- safetensors headers


def safetensors_file(path, header, data=b"\0" * 16):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("entry, what", [
    ({"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}, "tensor w's shape is not a list of whole numbers"),
    ({"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}, "tensor w's shape is not a list of whole numbers"),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, "tensor w's shape is not a list of whole numbers"),
    ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "tensor w has no dtype name"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}, "tensor w's data_offsets are not two whole numbers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "tensor w's data_offsets are not two whole numbers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}, "tensor w's data_offsets are not two whole numbers"),
    ("F32", "tensor w's entry is not a JSON object"),
    ({"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}, "truncated safetensors file (16 bytes of data, tensor w "
                                                              "ends at 32"),
])
def test_every_safetensors_header_field_is_checked(tmp_path, entry, what):
    path = safetensors_file(tmp_path / "x.safetensors", {"__metadata__": {"format": "pt"}, "w": entry})
    refused(files.read_safetensors, path, match=f"{path}: ")
    refused(files.read_safetensors, path, match=what)


def test_safetensors_tensors_may_not_share_bytes(tmp_path):
    """Each would become a network's weights of its own: a thousand names on one region claim a thousand times it."""
    header = {f"w{i}": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]} for i in range(2)}
    refused(files.read_safetensors, safetensors_file(tmp_path / "x.safetensors", header),
            match="x.safetensors: corrupted safetensors file (tensors w0 and w1 share bytes)")


# ----------------------------------------------------------------------------- a pipe or a device where a file belongs


def without_blocking(call, *args, timeout=30):
    """call(*args) in a thread; its exception, or a test failure if it is still running after `timeout` seconds
    (a reader opening a named pipe without a writer waits for ever: a write end opened here then frees it)."""
    outcome = {}

    def run():
        try:
            call(*args)
        except Exception as e:  # handed to the test
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for path in args:
            if isinstance(path, os.PathLike) and path.is_fifo():
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{call.__name__} blocked on {args}")
    return outcome.get("error")


def test_every_reader_refuses_a_pipe_or_a_device_without_waiting_on_it(tmp_path):
    pipe = tmp_path / "weights.pt"
    os.mkfifo(pipe)
    link = tmp_path / "63"  # what `--flag <(cat file)` passes: /dev/fd/63, a link to a pipe
    link.symlink_to(pipe)
    readers = [files.read_torch, files.read_safetensors, files.read_torchscript, clip.load, checkpoints.load_checkpoint,
               lambda path: metrics.load_inception(path, "cpu"), metrics.LPIPS,
               lambda path: files.read_state_dict(path, "ResNet-34", "--resnet"),
               lambda path: checkpoints.load_stage(path, 1, {}, {})]
    for reader in readers:
        for path in (pipe, link):
            error = without_blocking(reader, path)
            assert isinstance(error, ValueError) and str(error).startswith(f"{path}: a pipe, not a file"), error
            assert "save it to a file first" in str(error)
    error = without_blocking(files.read_torch, "/dev/zero")
    assert str(error).startswith("/dev/zero: a character device, not a file"), error


# ----------------------------------------------------------------------------- the project's own checkpoints


def hand_made_checkpoint(tmp_path, **config_overrides):
    """A checkpoint as train.py writes one, of an untrained tiny model on a random CLIP: load_checkpoint's input."""
    settings = config.resolve("toy", dict(
        image_size=16, vae_channels=32, vae_channel_mult=(1, 2), unet_channels=32, unet_channel_mult=(1, 2),
        unet_attention_levels=(1,), unet_num_heads=2, num_tokens=2, context_dim=32, mask_channels=8,
        mask_feature_channels=16, num_diffusion_steps=100))
    torch.manual_seed(0)
    random_clip = clip.CLIP(embed_dim=32, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
                            context_length=77, vocab_size=100, transformer_width=64, transformer_heads=1,
                            transformer_layers=1)
    categories = {"toy": ["crack"]}
    model = axf.AnomalyXFusion(settings, random_clip, categories)
    settings.update(config_overrides)
    return {"model": checkpoints.model_state_dict(model), "optimizer": {}, "ema": None, "step": 4, "config": settings,
            "rng": None, "torch_rng": {"cpu": torch.get_rng_state(), "cuda": None}, "categories": categories,
            "data_folders": {"toy": str(tmp_path)}, "sd_file": None, "sd_vae_file": None,
            "clip": random_clip.state_dict()}


def built_on_meta_only(monkeypatch):
    """Fail the test if a UNet is built anywhere but on the meta device (where it takes no memory): the refusal
    must come before. Returns the devices it was built on."""
    devices, build_unet = [], axf.build_unet

    def on_meta_only(settings):
        devices.append(torch.empty(()).device.type)
        assert devices[-1] == "meta", "a UNet was built before the checkpoint was checked"
        return build_unet(settings)
    monkeypatch.setattr(axf, "build_unet", on_meta_only)
    return devices


def test_a_hand_made_checkpoint_loads(tmp_path):
    """The forgeries below differ from this one by one field."""
    torch.save(hand_made_checkpoint(tmp_path), tmp_path / "axf.pt")
    model, _ = checkpoints.load_checkpoint(tmp_path / "axf.pt")
    assert model.categories == {"toy": ["crack"]}


@pytest.mark.parametrize("overrides, what", [
    (dict(unet_channels=4096, unet_num_res_blocks=4), "weights do not match the model its config describes"),
    (dict(num_tokens=10 ** 6), "its model tensor null_context is [1, 6, 32], the model its config describes has "
                               "[1, 3000000, 32]"),
    (dict(unet_num_res_blocks=10 ** 6), "its config describes 2,000,002 residual blocks but it holds"),
    (dict(num_diffusion_steps=10 ** 9), "its config's num_diffusion_steps is not at most 100,000"),
    (dict(image_size=2 ** 20), "its config's image_size is not at most 4096"),
    (dict(context_dim="32"), "its config's context_dim is not a whole number > 0"),
    (dict(context_dim=4096), "its config's context_dim 4096 is not the CLIP's width 32"),
    (dict(unet_channel_mult=[]), "its config's unet_channel_mult is not a list of one level or more"),
])
def test_a_config_that_claims_a_bigger_model_than_its_tensors_is_refused_before_building(tmp_path, monkeypatch,
                                                                                        overrides, what):
    """The networks are built from the config's sizes: a forged config of a tiny file would make the loader
    allocate them. The model is built on the meta device and compared first; T is range-checked (no tensor holds it)."""
    torch.save(hand_made_checkpoint(tmp_path, **overrides), tmp_path / "axf.pt")
    built_on_meta_only(monkeypatch)
    refused(checkpoints.load_checkpoint, tmp_path / "axf.pt", match=f"{tmp_path / 'axf.pt'}: ")
    refused(checkpoints.load_checkpoint, tmp_path / "axf.pt", match=what)


def test_a_checkpoint_tensor_that_repeats_one_number_is_refused_before_building(tmp_path, monkeypatch):
    checkpoint = hand_made_checkpoint(tmp_path)
    checkpoint["model"]["null_context"] = torch.zeros(1).expand(1, 10 ** 6, 32)
    torch.save(checkpoint, tmp_path / "axf.pt")
    devices = built_on_meta_only(monkeypatch)
    refused(checkpoints.load_checkpoint, tmp_path / "axf.pt", match="axf.pt: tensor model.null_context claims shape [1, 1000000, 32]")
    assert devices == []  # refused as it was read


class Config:
    """A class no checkpoint of this project pickles."""


def test_a_pickled_class_is_named_with_advice_that_fits(tmp_path, monkeypatch):
    checkpoint = hand_made_checkpoint(tmp_path)
    checkpoint["config"]["unet"] = Config()
    torch.save(checkpoint, tmp_path / "axf.pt")
    for load in (checkpoints.load_checkpoint, lambda path: checkpoints.load_stage(path, 4, checkpoint["config"], {"toy": ["crack"]})):
        refused(load, tmp_path / "axf.pt", match=f"{tmp_path / 'axf.pt'}: pickles test_files.Config, which a "
                                                 f"weights-only load does not run; {checkpoints.NOT_TRAIN_PY}")


@pytest.mark.parametrize("change, what", [
    (lambda c: c.clear(), "has no 'model'"),
    (lambda c: c.update(config=[1, 2]), "its 'config' is not a dict of settings"),
    (lambda c: c.update(categories={"toy": "crack"}), "its 'categories' is not a dict of categories' defect-type lists"),
    (lambda c: c.update(categories={}), "its 'categories' is not a dict of categories' defect-type lists"),
    (lambda c: c["model"].update(null_context=[0.0]), "its 'model' is not a dict of tensors"),
    (lambda c: c.update(step="4"), "its 'step' is not a whole number"),
    (lambda c: c.update(clip=None), "its 'clip' is not a dict of tensors (nor does its config name a CLIP file)"),
    (lambda c: c.update(data_folders=None), "its 'data_folders' is not a dict of folder names"),
    (lambda c: c["clip"].pop("ln_final.weight"), "its CLIP weights have no 'ln_final.weight' tensor"),
    (lambda c: c.update(ema={"null_context": torch.zeros(3)}), "its ema tensor null_context is [3], the model its config"),
    (lambda c: c.update(ema={"nothing": torch.zeros(3)}), "its ema tensor nothing is no parameter of the model"),
])
def test_a_hand_made_checkpoint_is_refused_in_one_line(tmp_path, change, what):
    checkpoint = hand_made_checkpoint(tmp_path)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "axf.pt")
    refused(checkpoints.load_checkpoint, tmp_path / "axf.pt", match=f"{tmp_path / 'axf.pt'}: {what}")


def test_an_empty_checkpoint_or_a_stages_is_named(tmp_path):
    (tmp_path / "axf.pt").write_bytes(b"")
    refused(checkpoints.load_checkpoint, tmp_path / "axf.pt", match="axf.pt: an empty file (0 bytes")
    checkpoint = hand_made_checkpoint(tmp_path)
    del checkpoint["clip"], checkpoint["data_folders"], checkpoint["sd_file"], checkpoint["sd_vae_file"]
    for name, state in (("vae.pt", axf.build_vae(checkpoint["config"]).state_dict()),
                        ("mask_ae.pt", axf.build_mask_autoencoder(checkpoint["config"]).state_dict())):
        torch.save(dict(checkpoint, model=state), tmp_path / name)
        stage = "stage-1 checkpoint (the VAE" if name == "vae.pt" else "stage-2 checkpoint (the mask autoencoder"
        refused(checkpoints.load_checkpoint, tmp_path / name, match=f"{name}: train.py's {stage} alone, {name}), not the model: "
                                                            f"pass axf.pt or the run folder")
