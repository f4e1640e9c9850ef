"""`charades_sta`: Charades-STA sentence grounding (jiyanggao/TALL, `charades_sta_{train,test}.txt`).

Format: a text file, one query per line: `<video id> <start> <end>##<sentence>`, e.g.
`3MSZA 24.3 30.4##person turn a light on.`; videos are `<video id>.mp4` (Charades v1, any folder
layout below `video_dir`).

Units: seconds on the video's timeline; no conversion. The file gives no duration or frame rate:
`sample` probes them, and a span past the end of the video goes to the ledger there.

Records: one `temporal` record per line, the sentence as the event to find, `answer_span` the span.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from pipeline.errors import InputError
from pipeline.stage import UnitContext
from stages.lib.schema import meta_dump
from stages.sources.base import Adapter, make_record, media, register_adapter
from stages.sources.layout import Lines, Unreadable

LINE = re.compile(r"^(?P<vid>\S+)\s+(?P<start>\S+)\s+(?P<end>\S+)\s*##(?P<sentence>.*\S.*)$")


@register_adapter
class CharadesSTAAdapter(Adapter):
    name = "charades_sta"
    aliases = ("charades",)
    layout = Lines()

    def check_head(self, head: Sequence[Any]) -> None:
        """A file none of whose first lines is a query is another format (a single bad line is a ledger row)."""
        if not any(not isinstance(entry, Unreadable) and LINE.match(entry[1]) for entry in head):
            number, line = head[0]
            raise InputError(f"{self.annotations}: line {number}: not the Charades-STA format "
                             f"'<video> <start> <end>##<sentence>': {line[:80]!r}")

    def entry_label(self, entry: Any, position: int) -> str:
        return f"line {entry[0]}"

    def seed(self, entry: Any, position: int, ctx: UnitContext) -> list[dict[str, Any]]:
        number, line = entry
        label = self.entry_label(entry, position)
        match = LINE.match(line)
        if match is None:
            raise self.reject(position, label, f"expected '<video> <start> <end>##<sentence>', got {line[:80]!r}")
        try:
            start, end = float(match["start"]), float(match["end"])
        except ValueError:
            raise self.reject(position, label, f"start/end must be seconds, got {match['start']!r} {match['end']!r}",
                              "start") from None
        if not 0 <= start < end:
            raise self.reject(position, label, f"span [{start}, {end}] must satisfy 0 <= start < end", "start")
        vid, sentence = match["vid"], match["sentence"].strip()
        return [make_record(
            source="charades_sta", source_id=f"{vid}#{number}", task="temporal", media=media(self.media_path(vid)),
            question=f'When does this happen: "{sentence}"?', answer_span=[start, end],
            ground_truth={"objects": [], "spans": [{"label": sentence, "start_s": start, "end_s": end}]},
            meta=meta_dump({"vid": vid, "line": number, "sentence": sentence}))]
