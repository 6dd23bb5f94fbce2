"""train.py used carelessly: each slip ends in one clear line naming the flag or file and what to do, with
nothing written before it; or, where the intent is plain, in the work asked for."""
import multiprocessing
import runpy
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import axf
import config
import data
import files
import toy
import train
from test_train_sample import TINY

REPO = Path(__file__).resolve().parent.parent


class Stop(Exception):
    """Raised in place of stage 1: the run got past every check (what these tests are about) and trains no further."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root of two categories at 32 px, with 8 normal training images each (they load in no time): the toy
    bottle, and plain, a category of normal images only."""
    root = tmp_path_factory.mktemp("data")
    bottle = toy.make_toy(root, "bottle", size=32, seed=0)
    for image in sorted((bottle / "train" / "good").iterdir())[8:]:
        image.unlink()
    shutil.copytree(bottle / "train", root / "plain" / "train")
    shutil.copytree(bottle / "test" / "good", root / "plain" / "test" / "good")
    return root


@pytest.fixture
def stop_at_stage_1(monkeypatch):
    """train_vae raises Stop with the output folder and the categories it was given."""
    def stop(train_set, config, out_dir, device, pretrained=None):
        raise Stop(out_dir, list(train_set["categories"]))
    monkeypatch.setattr(train, "train_vae", stop)


def run(root, out, *flags):
    """train.main on the tiny settings, then `flags` (the last of a flag wins)."""
    train.main(["--category", "bottle", "--data_root", str(root), "--out_dir", str(out)] + TINY + list(flags))


def refused(error):
    """The message of a refusal, asserted to be one line."""
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize("flag, value, message", [
    ("checkpoint_every", "0", "--checkpoint_every must be >= 1, not 0"),
    ("preview_every", "0", "--preview_every must be >= 1, not 0"),
    ("batch_size", "0", "--batch_size must be >= 1, not 0"),
    ("steps", "0", "--steps must be >= 1, not 0"),
    ("vae_steps", "0", "--vae_steps must be >= 1, not 0"),
    ("lr", "0", "--lr must be > 0, not 0.0"),
    ("lr", "nan", "--lr must be > 0, not nan"),
    ("ema_decay", "1", "--ema_decay must be 0 <= x < 1, not 1.0"),
    ("cond_dropout", "1.5", "--cond_dropout must be 0 <= x <= 1, not 1.5"),
    ("eta", "-0.5", "--eta must be 0 <= x <= 1, not -0.5"),
    ("num_tokens", "0", "--num_tokens must be >= 1, not 0"),
    ("sample_steps", "0", "--sample_steps must be >= 1, not 0"),
    ("sample_steps", "51", "--sample_steps 51 must be at most --num_diffusion_steps 50"),
    ("num_diffusion_steps", "100000", "--num_diffusion_steps must be 1 <= x <= 10000, not 100000"),
    ("lora_rank", "0", "--lora_rank must be >= 1, not 0"),
    ("unet_channel_mult", "", "--unet_channel_mult must be one or more, each >= 1, not (empty)"),
    ("vae_channel_mult", "1,0", "--vae_channel_mult must be one or more, each >= 1, not 1,0"),
    ("unet_channels", "48", "--unet_channels must be >= 32, a multiple of 32, not 48"),
    ("mask_channels", "12", "--mask_channels must be >= 8, a multiple of 8, not 12"),
    ("image_size", "30", "--image_size must be a power of two (the mask encoder halves it to 8x8 features), not 30"),
    ("image_size", "8", "--image_size must be >= 16, not 8"),
    ("vae_channel_mult", "1,2,2,2,2,2", "--image_size 32 is too small: --vae_channel_mult 1,2,2,2,2,2 halves it 5 "
                                        "times and --unet_channel_mult 1,2 1 times more; give at least 64"),
    ("unet_attention_levels", "2", "--unet_attention_levels 2 must each be a level of --unet_channel_mult 1,2: 0 to 1"),
    ("unet_num_heads", "3", "--unet_num_heads 3 must divide the width of every level with attention: 64"),
])
def test_a_value_out_of_range_is_refused_in_one_line_before_anything_is_written(root, tmp_path, stop_at_stage_1,
                                                                                flag, value, message):
    """A value the networks or the loop cannot use stops the run at once, naming the flag and what is allowed,
    not with a traceback mid-run (a step modulo 0, an empty batch, a GroupNorm that cannot split) after
    checkpoints were written."""
    with pytest.raises(ValueError) as error:
        run(root, tmp_path / "run", f"--{flag}", value)
    assert message in refused(error)
    assert not (tmp_path / "run").exists()


def test_every_problem_of_a_config_is_named_in_its_one_line(root, tmp_path, stop_at_stage_1):
    with pytest.raises(ValueError) as error:
        run(root, tmp_path / "run", "--checkpoint_every", "0", "--batch_size", "0")
    assert refused(error) == "--batch_size must be >= 1, not 0; --checkpoint_every must be >= 1, not 0"


def test_the_table_gives_every_number_a_range_its_default_and_presets_keep(capsys):
    """config.KEYS is the one place a key's range lives: every number has one, every preset lies within them,
    and --help shows them."""
    for name, key in config.KEYS.items():
        numeric = isinstance(key.default, (int, float)) and not isinstance(key.default, bool)
        assert key.range or not numeric or key.choices, name
    for preset in config.PRESETS:
        config.resolve(preset)
    with pytest.raises(SystemExit):
        train.main(["--help", "--toy"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--checkpoint_every INT steps between resumable checkpoints (default: 250) [allowed: >= 1]" in text
    assert "(default: 0.999) [allowed: 0 <= x < 1]" in text


def test_the_script_ends_a_refusal_with_one_error_line(root, tmp_path, monkeypatch):
    """`python train.py ...` as the shell runs it (its __main__ block, in this process: no second start of torch):
    the exit carries the one line Python prints to stderr, with exit status 1."""
    monkeypatch.setattr(axf, "build_vae", lambda config: (_ for _ in ()).throw(Stop()))  # past the checks: stop
    monkeypatch.setattr(sys, "argv", ["train.py", "--category", "bottle", "--data_root", str(root), "--out_dir",
                                      str(tmp_path / "run")] + TINY + ["--checkpoint_every", "0"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    assert exit.value.code == "error: --checkpoint_every must be >= 1, not 0"


# ---------------------------------------------------------------------------------------------- --category


@pytest.mark.parametrize("category, message", [
    ("", "--category '' names no category; give one (e.g. bottle), several separated by commas (bottle,cable), or all"),
    (",", "--category ',' names no category"),
    ("all,bottle", "--category all,bottle: all stands alone"),
    ("..", "--category ..: give a category's folder name, e.g. bottle"),
])
def test_a_category_that_names_nothing_is_refused(root, tmp_path, stop_at_stage_1, category, message):
    with pytest.raises(ValueError) as error:
        run(root, tmp_path / "run", "--category", category)
    assert message in refused(error)
    assert not (tmp_path / "run").exists()


def test_a_category_given_as_a_path_says_to_give_its_name_and_data_root(root, tmp_path, stop_at_stage_1):
    """An absolute path would make --data_root meaningless and its default out_dir runs/<path> the path itself
    (checkpoints inside the dataset)."""
    with pytest.raises(ValueError) as error:
        run(root, tmp_path / "run", "--category", str(root / "bottle"))
    assert refused(error) == (f"--category {root / 'bottle'}: give the category's folder name (bottle) and the "
                              f"folder that holds it as --data_root ({root})")
    assert not (tmp_path / "run").exists()


def test_a_trailing_slash_from_tab_completion_names_the_folder(root, tmp_path, monkeypatch, stop_at_stage_1):
    """`--category bottle/` is the folder bottle: it trains bottle, into runs/bottle."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Stop) as stopped:
        train.main(["--category", "bottle/", "--data_root", str(root)] + TINY)
    assert stopped.value.args == (Path("runs") / "bottle", ["bottle"])


@pytest.mark.parametrize("category", ["plain", "all", "bottle,plain"])
def test_a_category_without_anomalies_is_refused_by_name_before_anything_is_written(root, tmp_path, stop_at_stage_1,
                                                                                     category):
    """train.py learns defects from a category's few-shot anomalies: one without any is named, also within
    --category all, before the output folder is made."""
    with pytest.raises(ValueError) as error:
        run(root, tmp_path / "run", "--category", category)
    assert refused(error).startswith(f"{root / 'plain'}: no anomalous images (test/<defect>/*.png)")
    assert "leave plain out of --category" in str(error.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- files and folders


def test_data_root_slips_are_named(root, tmp_path, stop_at_stage_1):
    """--data_root a file, or the category folder itself; a category folder that is a file."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError) as error:
        run(tmp_path / "notes.txt", tmp_path / "run")
    assert refused(error) == (f"--data_root {tmp_path / 'notes.txt'} is a file; give the folder that holds the "
                              f"category folders")
    with pytest.raises(FileNotFoundError) as error:
        run(root / "bottle", tmp_path / "run")
    assert refused(error) == (f"--data_root {root / 'bottle'} is a category folder itself; give the folder that "
                              f"holds it: --data_root {root} --category bottle")
    with pytest.raises(ValueError) as error:
        run(tmp_path, tmp_path / "run", "--category", "notes.txt")
    assert refused(error).startswith(f"{tmp_path / 'notes.txt'}: a file, not a category folder")
    assert not (tmp_path / "run").exists() and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("out", ["notes.txt", "notes.txt/run"])
def test_an_out_dir_that_is_a_file_is_refused_and_the_file_kept(root, tmp_path, stop_at_stage_1, out):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError) as error:
        run(root, tmp_path / out)
    assert refused(error) == (f"--out_dir {tmp_path / out}: {tmp_path / 'notes.txt'} is a file; give a folder, new "
                              f"or of an earlier train.py run")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_out_dir_that_cannot_be_made_is_named(root, tmp_path, stop_at_stage_1):
    """/proc takes no new folders, not even root's (who may write anywhere else); the project runs on Linux."""
    with pytest.raises(ValueError) as error:
        run(root, Path("/proc/axf_run"))
    assert refused(error) == "--out_dir /proc/axf_run: cannot make it (No such file or directory); give a folder " \
                             "you can write to"


@pytest.mark.parametrize("device, message", [("gpu", "--device gpu: give auto, cpu, cuda or cuda:N"),
                                             ("cuda", "--device cuda asked for, but torch sees no CUDA GPU")])
def test_a_device_that_is_not_there_is_named(root, tmp_path, stop_at_stage_1, device, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, whatever this one has
    with pytest.raises(ValueError) as error:
        run(root, tmp_path / "run", "--device", device)
    assert refused(error) == message


# ---------------------------------------------------------------------------------------------- one run a folder


def test_a_second_run_on_a_folder_in_use_is_refused_and_writes_nothing(root, tmp_path, stop_at_stage_1):
    """Two train.py runs on one --out_dir would interleave their stages' checkpoints: the second is refused."""
    out = tmp_path / "run"
    with files.run_lock(out, "train.py run"):  # the first run, still going
        before = sorted(out.iterdir())
        with pytest.raises(ValueError) as error:
            run(root, out)
        assert refused(error).startswith(f"{out}: another train.py run (pid ")
        assert sorted(out.iterdir()) == before


def test_a_run_removes_the_temporary_files_a_killed_checkpoint_write_left(root, tmp_path, stop_at_stage_1):
    """A kill during a checkpoint's write leaves <name>.<pid>.tmp (GBs at SD sizes): the next run in the folder
    deletes them; anything else stays."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("vae.pt.4242.tmp", "axf.pt.17.tmp", "notes.txt", "axf.pt.backup.tmp"):
        (out / name).write_text("x")
    with pytest.raises(Stop):
        run(root, out)
    assert sorted(p.name for p in out.iterdir()) == [files.LOCK, "axf.pt.backup.tmp", "notes.txt"]


# ---------------------------------------------------------------------------------------------- the toy world


def generate_then_read(root, start, done, results):
    """One of two processes started together on a fresh clone: ensure_toy, then read the category over and over
    while the other process is still at it (as a training run reads it), once more after. Puts the folder's
    inode (which world it got) or the error on `results`."""
    start.wait()
    try:
        folder = toy.ensure_toy("bottle", root=root, size=32)
        world = folder.stat().st_ino
        with done.get_lock():
            done.value += 1
        while done.value < 2:
            data.load_category(folder)
        data.load_category(folder)
        results.put(world)
    except Exception as error:  # reported to the test, which names it
        results.put(f"{type(error).__name__}: {error}")


def test_two_processes_making_the_same_toy_category_at_once_both_use_one_whole_world(tmp_path, monkeypatch):
    """Two runs started together on a fresh clone both need the toy world: neither reads a half-written or
    half-deleted one, and the one that comes second uses the first one's (it does not replace it)."""
    monkeypatch.setitem(toy.TOY_COUNTS, "train", 24)  # a small world: the race is the same, in less time
    monkeypatch.setitem(toy.TOY_COUNTS, "per_defect", 3)
    draw = toy._toy_sample  # 10 ms more an image: both processes are drawing before either is done
    monkeypatch.setattr(toy, "_toy_sample", lambda *a, **k: time.sleep(0.01) or draw(*a, **k))
    fork = multiprocessing.get_context("fork")
    start, done, results = fork.Barrier(2), fork.Value("i", 0), fork.Queue()
    processes = [fork.Process(target=generate_then_read, args=(tmp_path, start, done, results)) for _ in range(2)]
    for process in processes:
        process.start()
    worlds = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert all(isinstance(world, int) for world in worlds), worlds
    assert worlds[0] == worlds[1] == (tmp_path / "bottle").stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["bottle"]
    assert len(data.load_category(tmp_path / "bottle").train_good) == 24
