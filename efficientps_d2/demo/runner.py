"""The demo's work loops: folders/globs of images, video files and webcams, with robust output.

- Images: unreadable files, and images the predictor cannot take (32-bit or float pixels, too
  thin for the test resize), are reported by name and skipped; the rest are processed, read as
  training reads them (16-bit images by their high byte, as OpenCV reads them).
- Video: frames are processed in order with a progress bar (frames/s); the writer falls back from
  mp4v/.mp4 to MJPG/.avi and says which it used; the output is written under a temporary name and
  renamed when closed, kept (and reported) when the input ends early or processing fails, and read
  back with ``cv2.VideoCapture`` to check it plays.
- With an export folder, COCO panoptic PNGs and ``predictions.json`` are written too (see
  :mod:`efficientps_d2.demo.coco_panoptic_writer`).
"""

import glob
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import cv2
from PIL import Image
from tqdm import tqdm

from ..atomic_io import (
    atomic_write,
    check_writable_file,
    check_writable_folder,
    remove_stale_temporaries,
    remove_stale_temporaries_of,
    temporary_path,
)
from ..data.image_files import read_image
from .coco_panoptic_writer import CocoPanopticWriter, ImageIds
from .predictor import ImageInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRunError",
    "VIDEO_CODECS",
    "VIDEO_EXTENSIONS",
    "ImageRunSummary",
    "VideoInputError",
    "VideoOutputError",
    "VideoRunSummary",
    "check_image_outputs",
    "collect_images",
    "count_video_frames",
    "display_available",
    "is_video_file",
    "open_video",
    "open_video_writer",
    "open_webcam",
    "read_bgr_image",
    "run_on_images",
    "run_on_video",
    "unique_stems",
    "video_output_path",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Files that --input refuses as videos by their name alone (others by opening them).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
# (fourcc, container extension) tried in order; mp4v/.mp4 plays almost everywhere, MJPG/.avi is
# the codec every OpenCV build can write.
VIDEO_CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))
_WINDOW = "EfficientPS"


class VideoInputError(RuntimeError):
    """A video file or webcam cannot be read."""


class VideoOutputError(RuntimeError):
    """No codec could write the output video."""


class ImageRunError(RuntimeError):
    """Processing stopped at an image: an error other than the image's own unreadability (the
    model's, writing an output). The message names the image and the error (the ``__cause__``);
    ``summary`` (:class:`ImageRunSummary`) says what was done before it, which is kept."""

    def __init__(self, path, error, summary):
        super().__init__(f"Processing '{path}' failed: {type(error).__name__}: {error}")
        self.path, self.summary = path, summary


def display_available():
    """Whether OpenCV can open a window (False with opencv-python-headless or without display)."""
    try:
        cv2.namedWindow(_WINDOW, cv2.WINDOW_NORMAL)
        cv2.destroyWindow(_WINDOW)
        return True
    except cv2.error:
        return False


# -------------------------------------------------------------------------------------------------
# Images
# -------------------------------------------------------------------------------------------------
def collect_images(inputs):
    """Expands files, folders (their image files, by extension) and glob patterns.

    Returns:
        (paths, problems): the files in order (without repeats), and (input, reason) for inputs
        that name nothing to process, or a video (see :func:`is_video_file`: ``--video-input``
        runs it).
    """
    paths, problems = [], []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f))
            )
            if not found:
                problems.append(
                    (item, f"folder holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
                )
        elif os.path.isfile(item):
            found = [item]
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                problems.append((item, "pattern matches no file"))
        else:
            found = []
            problems.append((item, "no such file or folder"))
        for path in found:
            if is_video_file(path):
                problems.append((path, f"a video, not an image: run it with --video-input {path}"))
            else:
                paths.append(path)
    unique = list(dict.fromkeys(os.path.normpath(p) for p in paths))
    return unique, problems


def is_video_file(path):
    """Whether ``path`` is a video rather than an image: a video file extension, or (a file that
    is not named and cannot be opened as an image) one that OpenCV decodes a frame of."""
    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return True
    if ext in IMAGE_EXTENSIONS:
        return False
    try:
        Image.open(path).close()  # reads the header only
        return False
    except Exception:  # PIL raises several types for what it cannot read
        pass
    capture = cv2.VideoCapture(path)
    try:
        # FFmpeg's "tty" demuxer plays any text file as a video of its characters ("ansi").
        fourcc = (int(capture.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF).to_bytes(4, "little")
        return capture.isOpened() and fourcc != b"ansi" and capture.read()[0]
    finally:
        capture.release()


def read_bgr_image(path):
    """An image file as an (H, W, 3) uint8 BGR array, read as training reads it:
    :func:`efficientps_d2.data.image_files.read_image` (Detectron2's ``read_image``, except that a
    16-bit grayscale image is read by its high byte, as OpenCV reads it, and a 32-bit or float one
    raises :class:`ImageInputError`)."""
    return read_image(path, format="BGR")


def unique_stems(paths):
    """File stem per path, suffixed "_1", "_2", ... where two inputs share a stem; a path given
    twice keeps its first stem."""
    stems, used = {}, set()
    for path in paths:
        if path in stems:
            continue
        stem = os.path.splitext(os.path.basename(path))[0]
        candidate, n = stem, 0
        while candidate in used:
            n += 1
            candidate = f"{stem}_{n}"
        used.add(candidate)
        stems[path] = candidate
    return stems


@dataclass
class ImageRunSummary:
    """Result of :func:`run_on_images`.

    Attributes:
        processed: (input path, visualisation path or None) per processed image.
        skipped: (input, reason) per input that was not processed.
        panoptic_json: the COCO panoptic json written, if any.
        unmatched_ids: images of the json whose id is their file stem: no data set image
            matched them, so ``pq_compute`` cannot score them against a ground truth.
        stopped_at: the image at which an error, Ctrl-C or Esc stopped the run (None if none did).
        not_processed: the images from ``stopped_at`` on, which were not processed.
    """

    processed: List[Tuple[str, Optional[str]]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    panoptic_json: Optional[str] = None
    unmatched_ids: List[str] = field(default_factory=list)
    stopped_at: Optional[str] = None
    not_processed: int = 0

    def report(self):
        lines = [f"Processed {len(self.processed)} images, skipped {len(self.skipped)}."]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        if self.stopped_at is not None:
            lines.append(
                f"  Stopped at '{self.stopped_at}': it and the images after it "
                f"({self.not_processed} in all) were not processed."
            )
            if self.panoptic_json:
                lines.append(
                    f"  PARTIAL COCO panoptic predictions (only the {len(self.processed)} images "
                    f"processed before the stop): {self.panoptic_json}"
                )
        else:
            lines += _export_lines(self.panoptic_json)
        if self.unmatched_ids:
            lines.append(
                f"  {len(self.unmatched_ids)} images have their file name as image id (e.g. "
                f"'{os.path.basename(self.unmatched_ids[0])}'): they are in no data set's image "
                "list and their names are not numeric COCO ids; pass --image-info (a COCO json) "
                "to score them against a ground truth."
            )
        return "\n".join(lines)


def _export_lines(panoptic_json, indent=""):
    return [f"{indent}COCO panoptic predictions: {panoptic_json}"] if panoptic_json else []


def check_image_outputs(output, paths, save_panoptic=False):
    """Refuses, before any work, an ``output`` that :func:`run_on_images` cannot write as asked:
    an image file name with several inputs or that cannot be written (a folder, or under a file:
    :func:`~efficientps_d2.atomic_io.check_writable_file`), a folder that cannot be made
    (:func:`~efficientps_d2.atomic_io.check_writable_folder`), or a drawing or panoptic PNG that
    would overwrite one of the input images (``--output`` naming the input folder). Raises
    ValueError naming the path."""
    if _names_image_file(output):
        if len(paths) != 1:
            raise ValueError(
                f"--output '{output}' names one image file, but there are {len(paths)} images: "
                "name a folder."
            )
        check_writable_file(output, "--output")
    else:
        check_writable_folder(output, "--output")
    stems = unique_stems(paths)
    inputs = {os.path.realpath(p): p for p in paths}
    for path in paths:
        written = [_image_output_path(output, path, stems[path], len(paths) == 1)]
        if save_panoptic:
            written.append(os.path.join(_export_folder(output), "panoptic", stems[path] + ".png"))
        for out in written:
            if os.path.realpath(out) in inputs:
                raise ValueError(
                    f"--output '{output}' would overwrite the input image "
                    f"'{inputs[os.path.realpath(out)]}' with an output: name another folder."
                )


def _names_image_file(output):
    return os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS


def _image_output_path(output, path, stem, single):
    ext = os.path.splitext(path)[1].lower()
    if single and _names_image_file(output):
        return output  # one input, --output names the file
    name = stem + (ext if ext in (".jpg", ".jpeg", ".png") else ".png")
    return os.path.join(output, name)


def _export_folder(output):
    """Folder of the COCO panoptic export: ``output`` itself, or the folder of an output file."""
    if os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS + tuple(e for _, e in VIDEO_CODECS):
        return os.path.dirname(os.path.abspath(output))
    return output


def run_on_images(
    demo, paths, output=None, *, save_panoptic=False, show=False, problems=(), image_ids=None
):
    """Runs ``demo`` on image files; unreadable ones are reported and skipped.

    Args:
        demo: a :class:`~efficientps_d2.demo.VisualizationDemo`.
        paths: image files (see :func:`collect_images`).
        output: folder for the visualisations (created), or an image file name when there is one
            input (see :func:`check_image_outputs`); None: nothing is written.
        save_panoptic: also write COCO panoptic PNGs to ``<folder>/panoptic/`` and
            ``<folder>/predictions.json`` (needs ``output`` and a data set's metadata).
        show: show each visualisation in a window (waits for a key).
        problems: (input, reason) found while collecting, carried into the summary.
        image_ids: :class:`~efficientps_d2.demo.coco_panoptic_writer.ImageIds` giving the json's
            ``image_id`` of each file (default: numeric file names as integers, else the stem).
    Returns:
        :class:`ImageRunSummary`.
    Raises:
        ImageRunError: an error at an image other than its being unreadable or one the predictor
            cannot take (which are skipped), naming the image; the outputs of the images before
            it are kept, and ``predictions.json``, written with them, is marked partial (its
            "info" says where the run stopped).
    """
    image_ids = image_ids if image_ids is not None else ImageIds()
    summary = ImageRunSummary(skipped=list(problems))
    writer = None
    if output:
        check_image_outputs(output, paths, save_panoptic)
    if save_panoptic:
        if not output:
            raise ValueError("The COCO panoptic export (--save-panoptic) needs an output folder.")
        folder = _export_folder(output)
        writer = CocoPanopticWriter(
            os.path.join(folder, "predictions.json"),
            os.path.join(folder, "panoptic"),
            demo.metadata,
        )
    stems = unique_stems(paths)
    if writer is not None:  # files that match no image id are named by their unique stems
        image_ids.check_unique(paths, stems)
    _remove_stale_outputs(output, paths, stems, writer)
    earlier, interrupted = len(summary.skipped), False  # the problems of collecting the paths
    try:
        for path in tqdm(paths, unit="image", disable=len(paths) < 2):
            try:
                image = read_bgr_image(path)
            except Exception as e:  # PIL raises several types for unreadable files
                reason = (
                    str(e)
                    if isinstance(e, ImageInputError)
                    else f"unreadable image ({type(e).__name__}: {e})"
                )
                logger.warning(f"Skipping '{path}': {reason}")
                summary.skipped.append((path, reason))
                continue
            start = time.perf_counter()
            try:
                predictions, vis = demo.run_on_image(image)
            except ImageInputError as e:  # e.g. too thin for the test resize: the others may run
                logger.warning(f"Skipping '{path}': {e}")
                summary.skipped.append((path, str(e)))
                continue
            segments = predictions["panoptic_seg"][1]
            logger.info(
                f"{path}: {len(segments)} segments ({sum(s['isthing'] for s in segments)} things) "
                f"in {time.perf_counter() - start:.2f}s"
            )
            out_path = None
            if output:
                out_path = _image_output_path(output, path, stems[path], len(paths) == 1)
                drawn = vis.get_image()[:, :, ::-1]
                atomic_write(out_path, lambda tmp: _imwrite(tmp, drawn), mode=None)
            if writer is not None:
                height, width = image.shape[:2]
                writer.add(
                    image_ids.lookup(path, default=stems[path]),
                    os.path.basename(path),
                    *predictions["panoptic_seg"],
                    height=height,
                    width=width,
                    png_name=stems[path] + ".png",
                )
            summary.processed.append((path, out_path))
            if show:
                cv2.imshow(_WINDOW, vis.get_image()[:, :, ::-1])
                if cv2.waitKey(0) == 27:  # Esc stops: the images after this one are not run
                    _record_stop(summary, paths, earlier)
                    break
    except BaseException as e:
        _record_stop(summary, paths, earlier)
        if isinstance(e, Exception) and summary.stopped_at is not None:
            raise ImageRunError(summary.stopped_at, e, summary) from e
        interrupted = True  # Ctrl-C: the caller exits; a partial json is named below
        raise
    finally:
        if writer is not None and writer.images:
            partial = None
            if summary.stopped_at is not None:
                partial = (
                    f"stopped at '{summary.stopped_at}': holds the {len(writer.images)} images "
                    f"processed before it, not the {summary.not_processed} from it on"
                )
            summary.panoptic_json = writer.write_json(partial=partial)
            summary.unmatched_ids = list(image_ids.unmatched)
            if partial and interrupted:  # else the caller reports the summary
                logger.warning(f"'{summary.panoptic_json}' is partial: {partial}.")
    return summary


def _record_stop(summary, paths, earlier):
    """Records in ``summary`` where a run over ``paths`` stopped, if before their end. Each image
    finished added one entry to ``processed`` or ``skipped``, after the ``earlier`` ones."""
    done = len(summary.processed) + len(summary.skipped) - earlier
    if done < len(paths):
        summary.stopped_at, summary.not_processed = paths[done], len(paths) - done


def _remove_stale_outputs(output, paths, stems, writer):
    """Removes the temporary files that a killed run writing these outputs left behind (one
    listing per folder)."""
    targets = {}
    if output:
        for path in paths:
            out = os.path.abspath(_image_output_path(output, path, stems[path], len(paths) == 1))
            targets.setdefault(os.path.dirname(out), set()).add(os.path.basename(out))
    if writer is not None:
        png_dir = os.path.abspath(writer.png_dir)
        targets.setdefault(png_dir, set()).update(stems[p] + ".png" for p in paths)
        json_file = os.path.abspath(writer.json_file)
        targets.setdefault(os.path.dirname(json_file), set()).add(os.path.basename(json_file))
    for folder, names in targets.items():
        remove_stale_temporaries(folder, names)


def _imwrite(path, image):
    if not cv2.imwrite(path, image):
        raise OSError(f"OpenCV could not write '{path}'.")


# -------------------------------------------------------------------------------------------------
# Video
# -------------------------------------------------------------------------------------------------
def open_video(path):
    """``cv2.VideoCapture`` of a video file; VideoInputError naming the path if unreadable."""
    if not os.path.isfile(path):
        raise VideoInputError(f"Video '{path}' does not exist.")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise VideoInputError(
            f"Video '{path}' cannot be opened: not a video, or encoded with a codec this OpenCV "
            "build cannot decode."
        )
    return capture


def open_webcam(index=0):
    """``cv2.VideoCapture`` of a camera; VideoInputError naming the device if there is none."""
    capture = cv2.VideoCapture(int(index))
    if not capture.isOpened():
        raise VideoInputError(
            f"Webcam {index} cannot be opened (no camera at /dev/video{index}, the device is busy, "
            "or OpenCV was built without camera support)."
        )
    return capture


def open_video_writer(path, fps, size, codecs=VIDEO_CODECS):
    """Opens a ``cv2.VideoWriter``, trying codecs in order until one works.

    Codecs whose container matches ``path``'s extension are tried first; the others change the
    extension (e.g. "out.mp4" becomes "out.avi" with MJPG). The writer writes to a temporary file
    next to the final one; rename it when done (:func:`run_on_video` does).

    Args:
        path: the wanted output file.
        fps: frames per second.
        size: (width, height) of the frames.
        codecs: (fourcc, extension) pairs.
    Returns:
        (writer, temporary path, final path, fourcc).
    Raises:
        VideoOutputError: no codec could open a writer (all tried are listed).
    """
    stem, ext = os.path.splitext(path)
    ordered = [c for c in codecs if c[1] == ext.lower()] + [
        c for c in codecs if c[1] != ext.lower()
    ]
    tried = []
    for fourcc, extension in ordered:
        final = stem + extension
        # Leftovers of a killed run writing the same file: never read, only in the way.
        remove_stale_temporaries_of(final)
        tmp = temporary_path(final)
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*fourcc), float(fps), tuple(size))
        if writer.isOpened():
            if final != path:
                logger.warning(f"Codec {fourcc} writes '{final}' instead of '{path}'.")
            return writer, tmp, final, fourcc
        writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
        tried.append(f"{fourcc} ({extension})")
    raise VideoOutputError(
        f"No video codec could write '{path}' (tried {', '.join(tried)}). Write images instead, or "
        "install an OpenCV build with FFmpeg."
    )


def count_video_frames(path):
    """Number of frames ``cv2.VideoCapture`` decodes from ``path`` (0 if it cannot open it)."""
    capture = cv2.VideoCapture(path)
    count = 0
    try:
        while capture.isOpened():
            ok, _ = capture.read()
            if not ok:
                break
            count += 1
    finally:
        capture.release()
    return count


@dataclass
class VideoRunSummary:
    """Result of :func:`run_on_video`.

    Attributes:
        source: the video path or "webcam N".
        output: the video written (None if none).
        codec: its fourcc.
        frames_read: frames decoded from the input.
        frames_processed: frames run through the model and drawn (one fewer than read when a
            stop, such as Ctrl-C, interrupts a frame).
        frames_expected: the input's frame count by its header (None for webcams or unknown).
        frames_written: frames written to the output.
        frames_verified: frames decoded back from the output (None if nothing was written).
        stopped: why processing ended early ("" if it did not).
        panoptic_json: the COCO panoptic json written, if any.
    """

    source: str
    output: Optional[str] = None
    codec: Optional[str] = None
    frames_read: int = 0
    frames_processed: int = 0
    frames_expected: Optional[int] = None
    frames_written: int = 0
    frames_verified: Optional[int] = None
    stopped: str = ""
    panoptic_json: Optional[str] = None

    @property
    def ended_early(self):
        """Whether fewer frames were read than the input's header counts."""
        return self.frames_expected is not None and self.frames_read < self.frames_expected

    @property
    def complete(self):
        """Whether every frame of the input was processed and the output plays in full."""
        unverified = self.output is not None and self.frames_verified != self.frames_written
        return not (self.ended_early or unverified or self.stopped)

    def report(self):
        lines = [f"{self.source}: processed {self.frames_processed} frames."]
        # A stop (Ctrl-C, Esc, an error) gives its own reason below: the input did not end.
        if self.ended_early and not self.stopped:
            lines.append(
                f"  The input ended after {self.frames_read} of its {self.frames_expected} frames "
                "(truncated file or a frame that does not decode); the output keeps the frames "
                "processed."
            )
        if self.stopped:
            lines.append(f"  Stopped early: {self.stopped}")
        if self.output:
            lines.append(
                f"  Wrote {self.frames_written} frames to '{self.output}' (codec {self.codec}); "
                f"{self.frames_verified} read back."
            )
        lines += _export_lines(self.panoptic_json, indent="  ")
        return "\n".join(lines)


def _frames(capture, summary):
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        summary.frames_read += 1
        yield frame


def video_output_path(output, source_name):
    """The output video file: ``output`` itself, or ``<output>/<source stem>.mp4`` for a folder.
    Raises ValueError where it cannot be written (see
    :func:`~efficientps_d2.atomic_io.check_writable_folder` and ``check_writable_file``) or where
    it is the input video itself."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)) or not os.path.splitext(output)[1]:
        check_writable_folder(output, "--output")
        stem = os.path.splitext(os.path.basename(source_name))[0] or "video"
        path = os.path.join(output, stem + ".mp4")
    else:
        check_writable_file(output, "--output")
        path = output
    if os.path.isfile(path) and os.path.isfile(source_name) and os.path.samefile(path, source_name):
        raise ValueError(
            f"--output '{output}' would overwrite the input video '{source_name}': name another "
            "file or folder."
        )
    return path


def run_on_video(
    demo,
    capture,
    source_name,
    output=None,
    *,
    save_panoptic=False,
    show=False,
    codecs=VIDEO_CODECS,
    progress=True,
):
    """Runs ``demo`` on every frame of ``capture``, in order.

    Args:
        demo: a :class:`~efficientps_d2.demo.VisualizationDemo`.
        capture: an opened ``cv2.VideoCapture`` (see :func:`open_video`, :func:`open_webcam`);
            released at the end.
        source_name: the video's path (names the output) or e.g. "webcam 0".
        output: output video file, or folder (``<stem>.mp4`` inside); None: nothing is written.
        save_panoptic: also write COCO panoptic PNGs (one per frame) and ``predictions.json`` to
            the output's folder.
        show: show the frames in a window (Esc stops).
        codecs: see :func:`open_video_writer`.
        progress: show a tqdm progress bar (frames/s).
    Returns:
        :class:`VideoRunSummary` (check ``complete``; its ``report()`` says what fell short). A
        failure while processing keeps what was written, logs the summary, then re-raises.
    """
    summary = VideoRunSummary(source=source_name)
    expected = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    summary.frames_expected = int(expected) if expected and expected > 0 else None
    fps = capture.get(cv2.CAP_PROP_FPS)
    if not fps or not math.isfinite(fps) or not 0 < fps <= 1000:
        fps = 30.0
    path = video_output_path(output, source_name) if output else None
    stem = os.path.splitext(os.path.basename(path or source_name))[0] or "frame"
    writer = tmp = panoptic = None
    failed = False
    if save_panoptic:
        if not output:
            raise ValueError("The COCO panoptic export (--save-panoptic) needs an output.")
        folder = os.path.dirname(os.path.abspath(path))
        panoptic = CocoPanopticWriter(
            os.path.join(folder, "predictions.json"),
            os.path.join(folder, "panoptic"),
            demo.metadata,
        )
    bar = tqdm(
        total=summary.frames_expected,
        unit="frame",
        desc=os.path.basename(source_name),
        disable=not progress,
    )
    try:
        for index, (predictions, vis) in enumerate(demo.run_on_video(_frames(capture, summary))):
            if path and writer is None:
                height, width = vis.shape[:2]
                writer, tmp, summary.output, summary.codec = open_video_writer(
                    path, fps, (width, height), codecs
                )
                logger.info(f"Writing '{summary.output}' with codec {summary.codec}.")
            if writer is not None:
                writer.write(vis)
                summary.frames_written += 1
            if panoptic is not None:
                height, width = vis.shape[:2]
                panoptic.add(
                    f"{stem}_{index:06d}",
                    f"{stem}_{index:06d}.png",
                    *predictions["panoptic_seg"],
                    height=height,
                    width=width,
                )
            summary.frames_processed += 1
            bar.update(1)
            if show:
                cv2.imshow(_WINDOW, vis)
                if cv2.waitKey(1) == 27:  # Esc stops
                    summary.stopped = "stopped by the user"
                    break
    except KeyboardInterrupt:
        summary.stopped = "interrupted"
    except BaseException as e:
        summary.stopped = f"{type(e).__name__} at frame {summary.frames_read}: {e}"
        failed = True  # the caller gets no summary: report it here
        raise
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
            os.replace(tmp, summary.output)
            summary.frames_verified = count_video_frames(summary.output)
            if summary.frames_verified != summary.frames_written:
                logger.warning(
                    f"'{summary.output}' reads back {summary.frames_verified} frames, "
                    f"{summary.frames_written} were written."
                )
        if panoptic is not None and panoptic.images:
            partial = summary.stopped and f"stopped early ({summary.stopped})"
            summary.panoptic_json = panoptic.write_json(partial=partial)
        if failed:
            logger.warning(summary.report())
    if summary.frames_read == 0:
        raise VideoInputError(f"{source_name}: no frame could be decoded.")
    return summary
