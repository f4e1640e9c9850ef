"""`activitynet_captions` (alias `activitynet`): ActivityNet Captions dense captions (`train.json`, `val_1.json`, ...).

Format: a JSON object keyed by video id (`"v_QOlSCBRmfWY"`); each value has `duration` (seconds),
`timestamps` (one `[start, end]` in seconds per sentence) and `sentences`. Video files are named
by id with or without the `v_` prefix (`v_QOlSCBRmfWY.mp4` or `QOlSCBRmfWY.mkv`): both are looked for
below `video_dir`.

Units: seconds; no conversion. `duration` becomes the declared duration (a video much shorter than
it is ledgered as truncated by `sample`, a timestamp past the end as `gt_time_outside_video`).

Records: one `temporal` record per sentence.
"""
from __future__ import annotations

from typing import Any

from pydantic import PositiveFloat, model_validator

from pipeline.stage import UnitContext
from stages.lib.schema import meta_dump
from stages.sources.base import Adapter, Entry, make_record, media, register_adapter
from stages.sources.layout import JsonEntries


class ActivityNetEntry(Entry):
    duration: PositiveFloat
    timestamps: list[tuple[float, float]]
    sentences: list[str]

    @model_validator(mode="after")
    def _paired(self) -> "ActivityNetEntry":
        if len(self.timestamps) != len(self.sentences):
            raise ValueError(f"{len(self.timestamps)} timestamps for {len(self.sentences)} sentences")
        for k, (start, end) in enumerate(self.timestamps):
            if not 0 <= start < end:
                raise ValueError(f"timestamps[{k}] = [{start}, {end}] must satisfy 0 <= start < end")
        return self


@register_adapter
class ActivityNetCaptionsAdapter(Adapter):
    name = "activitynet_captions"
    aliases = ("activitynet",)
    layout = JsonEntries(dict, "a JSON object keyed by video id")

    def entry_label(self, entry: Any, position: int) -> str:
        return f"entry {position} ({entry[0]})"

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        vid, value = entry
        e: ActivityNetEntry = self.validate(ActivityNetEntry, value, position, self.entry_label(entry, position))
        uri = self.media_path(vid, vid.removeprefix("v_"))
        declared = media(uri, duration_s=e.duration)
        return [make_record(
            source="activitynet_captions", source_id=f"{vid}#{k}", task="temporal", media=declared,
            question=f'When does this happen: "{sentence.strip()}"?', answer_span=[start, end],
            ground_truth={"objects": [], "spans": [{"label": sentence.strip(), "start_s": start, "end_s": end}]},
            meta=meta_dump({"vid": vid, "sentence_index": k, "sentence": sentence.strip(), "duration": e.duration}))
            for k, ((start, end), sentence) in enumerate(zip(e.timestamps, e.sentences))]

