"""What each source licence allows when a dataset folder is published, and the Hub metadata it asks for.

One table, `POLICIES`, keyed by the catalog's licence strings. A licence that is not in it (and "unknown")
is treated as forbidding redistribution: `cpia push` refuses such subsets unless they are named in
`--include-restricted`. Licences with terms (non-commercial use, data-use policies) make the pushed card
gated: the Hub asks every user to accept the terms before the files can be downloaded.

`clear_for_push` is the gate of `cpia push`: besides what a licence allows, it asks on what evidence the
licence rests (the catalog's `license_status`): unknown and conflicting licences are refused like restricted
ones, and a licence known only second-hand (a mirror, a third-party catalogue) is published only when the
publisher names that subset in `--accept-second-hand`, which the card then records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .catalog import CatalogEntry


@dataclass(frozen=True)
class LicencePolicy:
    redistribute: bool
    hub_id: str | None = None  # the Hub's licence identifier, None when the Hub has none ("other")
    link: str | None = None
    terms: str | None = None  # what a user must accept; None: no gating needed


POLICIES: dict[str, LicencePolicy] = {
    "CC0-1.0": LicencePolicy(True, "cc0-1.0", "https://creativecommons.org/publicdomain/zero/1.0/"),
    "CC-BY-4.0": LicencePolicy(True, "cc-by-4.0", "https://creativecommons.org/licenses/by/4.0/"),
    "CC-BY-3.0": LicencePolicy(True, "cc-by-3.0", "https://creativecommons.org/licenses/by/3.0/"),
    "MIT": LicencePolicy(True, "mit", "https://opensource.org/license/mit"),
    "CC-BY-NC-SA-3.0": LicencePolicy(
        True, "cc-by-nc-sa-3.0", "https://creativecommons.org/licenses/by-nc-sa/3.0/",
        "Images of the CC-BY-NC-SA-3.0 subsets are for non-commercial use only; adaptations must be shared "
        "under the same licence."),
    "CC-BY-NC-SA-4.0": LicencePolicy(
        True, "cc-by-nc-sa-4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/",
        "Images of the CC-BY-NC-SA-4.0 subsets are for non-commercial use only; adaptations must be shared "
        "under the same licence."),
    "GDC open access": LicencePolicy(
        True, None, "https://gdc.cancer.gov/access-data/data-access-processes-and-tools",
        "TCGA images (NCI Genomic Data Commons, open access): do not attempt to identify any participant, "
        "and acknowledge TCGA and the GDC in publications."),
    "PAIP data use agreement": LicencePolicy(False, None, "https://paip2019.grand-challenge.org/"),
    "MHIST dataset research use agreement": LicencePolicy(False, None, "https://bmirds.github.io/MHIST/"),
}
RESTRICTED = LicencePolicy(False)


def policy(licence: str) -> LicencePolicy:
    """The policy of a licence string; unknown or unlisted licences forbid redistribution."""
    return POLICIES.get(licence, RESTRICTED)


def hub_licence_metadata(licences: dict[str, str], licence_file: str) -> dict:
    """Card metadata for the included subsets' licences: `license` (one id or a list), and for licences
    without a Hub id `license_name` / `license_link` pointing at the per-source licence file."""
    ids = sorted({policy(lic).hub_id or "other" for lic in licences.values()})
    metadata: dict = {"license": ids[0] if len(ids) == 1 else ids}
    if "other" in ids:
        metadata.update(license_name="cpia-source-licenses", license_link=licence_file)
    return metadata


def gating_metadata(licences: dict[str, str]) -> dict:
    """`extra_gated_prompt` / `extra_gated_fields` when any included licence asks for terms; {} otherwise."""
    terms = sorted({policy(lic).terms for lic in licences.values() if policy(lic).terms})
    if not terms:
        return {}
    prompt = ("CPIA keeps the licence of each source dataset (column `license`, LICENSES.md). To access it you "
              "agree to the terms of the sources it contains:\n\n" + "\n".join(f"- {t}" for t in terms))
    return {
        "extra_gated_prompt": prompt,
        "extra_gated_fields": {
            "Name": "text",
            "Affiliation": "text",
            "Intended use": "text",
            "I agree to use these data under the terms above, citing CPIA and each source I use": "checkbox",
        },
    }


ACKNOWLEDGED = ("included_restricted", "accepted_second_hand")
CARD_KEY = "cpia_licence_acknowledgements"  # card metadata: what the publisher chose to publish on their own word


@dataclass(frozen=True)
class Clearance:
    """The licence gate's verdict on a folder's subsets: what each licence rests on, and what the publisher
    chose to publish on their own responsibility (recorded in the card and LICENSES.md)."""

    statuses: dict[str, str | None]  # subset -> licence status; None: the catalog records no evidence
    sources: dict[str, str] = field(default_factory=dict)  # subset -> URL that states the licence
    included_restricted: tuple[str, ...] = ()
    accepted_second_hand: tuple[str, ...] = ()

    def card_metadata(self) -> dict:
        named = {key: list(getattr(self, key)) for key in ACKNOWLEDGED if getattr(self, key)}
        return {CARD_KEY: named} if named else {}

    def evidence(self, subset: str) -> str:
        status = self.statuses.get(subset)
        if status is None:
            return "not recorded"
        text = f"{status}, {self.sources[subset]}" if subset in self.sources else status
        if subset in self.accepted_second_hand:
            text += " (accepted second-hand by the publisher)"
        if subset in self.included_restricted:
            text += " (published by the publisher's own right)"
        return text


class LicenceRefused(Exception):
    """`cpia push` must not publish the folder as it stands; the message lists each subset and what to do."""


def clear_for_push(folder: Path, licences: dict[str, str], entries: list[CatalogEntry], include_restricted: str,
                   accept_second_hand: str) -> Clearance:
    """The licence gate of `cpia push` over the folder's subsets (subset -> licence of its rows).

    Refused unless named in `include_restricted` (comma-separated): an unknown or conflicting licence, a
    licence that does not allow redistribution, and rows whose licence is not the catalog's (the catalog's
    evidence is for its own licence: rebuild). A second-hand licence needs its subset in `accept_second_hand`.
    A subset the catalog does not list is judged by its licence alone. Raises ValueError for a name that is not
    a subset of the folder (or, in `accept_second_hand`, not a second-hand one), LicenceRefused otherwise.
    """
    by_name = {entry.name: entry for entry in entries}
    statuses = {s: _status(lic, by_name.get(s)) for s, lic in sorted(licences.items())}
    restricted = _names(include_restricted, "--include-restricted", folder, licences)
    accepted = _names(accept_second_hand, "--accept-second-hand", folder, licences)
    not_second_hand = sorted(s for s in accepted if statuses[s] != "second-hand")
    if not_second_hand:
        raise ValueError("--accept-second-hand names subsets whose licence is not second-hand: "
                         + ", ".join(f"{s} ({statuses[s] or 'no evidence recorded'})" for s in not_second_hand))
    refused = {s: why for s, lic in licences.items() if s not in restricted
               and (why := _refusal(lic, statuses[s], by_name.get(s)))}
    unaccepted = [s for s, status in statuses.items()
                  if status == "second-hand" and s not in restricted | accepted and s not in refused]
    if refused or unaccepted:
        raise LicenceRefused(_refusal_text(folder, licences, refused, unaccepted, by_name))
    sources = {s: by_name[s].license_source for s in licences
               if s in by_name and by_name[s].license_source and statuses[s] is not None}
    return Clearance(statuses, sources, tuple(sorted(restricted)), tuple(sorted(accepted)))


def _status(licence: str, entry: CatalogEntry | None) -> str | None:
    if entry is None:
        return None
    return entry.license_status if entry.license == licence else "unknown"


def _names(text: str, flag: str, folder: Path, licences: dict[str, str]) -> set[str]:
    named = {name.strip() for name in text.split(",") if name.strip()}
    missing = sorted(named - set(licences))
    if missing:
        raise ValueError(f"{flag} names subsets not in {folder}: {missing}")
    return named


def _refusal(licence: str, status: str | None, entry: CatalogEntry | None) -> str | None:
    if entry is not None and entry.license != licence:
        return f"the catalog now says {entry.license!r} ({entry.license_status}): rebuild this subset"
    if status == "unknown" or licence == "unknown":
        return "no licence established"
    if status == "conflict":
        return f"sources disagree, see {entry.license_source}"
    if not policy(licence).redistribute:
        return "does not allow redistribution"
    return None


def _refusal_text(folder: Path, licences: dict[str, str], refused: dict[str, str], unaccepted: list[str],
                  entries: dict[str, CatalogEntry]) -> str:
    lines = []
    if refused:
        lines.append(f"cpia push: refused: {len(refused)} subset(s) of {folder} have a licence that is unknown, "
                     f"conflicting or does not allow redistribution:")
        lines += [f"  {s}: {licences[s]} ({why})" for s, why in sorted(refused.items())]
        lines.append("Rebuild without them (cpia convert --subsets ...), or, if you hold the right to publish them, "
                     "name them in --include-restricted.")
    if unaccepted:
        lines.append(f"cpia push: {len(unaccepted)} subset(s) of {folder} have a licence known only second-hand "
                     f"(a mirror or third-party catalogue, not the owner):")
        lines += [f"  {s}: {licences[s]} per {entries[s].license_source}" for s in unaccepted]
        lines.append("Confirm each with its owner (docs/sources.md, Licences), then name them in "
                     "--accept-second-hand NAME,...; the card records that you did.")
    return "\n".join(lines)


def licence_file(licences: dict[str, str], homepages: dict[str, str], clearance: Clearance | None = None) -> str:
    """LICENSES.md: one row per included subset with its licence, the evidence it rests on, the licence link and
    the source's homepage; then what the publisher chose to publish on their own word."""
    lines = ["# Licences of the CPIA sources", "",
             "Every image keeps the licence of its source dataset (column `license`). Using CPIA means "
             "accepting each source's terms. *Evidence*: where the licence is stated: `owner` (the dataset owner's "
             "page), `second-hand` (a mirror or third-party catalogue), `conflict`, `unknown`.", "",
             "| subset | licence | evidence | licence text | source |", "|---|---|---|---|---|"]
    clearance = clearance or Clearance({})
    for subset, lic in sorted(licences.items()):
        link = policy(lic).link or ""
        lines.append(f"| {subset} | {lic} | {clearance.evidence(subset)} | {link} | {homepages.get(subset, 'unknown')} |")
    if clearance.accepted_second_hand:
        lines += ["", "Published on second-hand licence evidence, accepted by the publisher "
                      f"(`--accept-second-hand`): {', '.join(clearance.accepted_second_hand)}."]
    if clearance.included_restricted:
        lines += ["", "Published although their licence is unknown, conflicting or restricted, on the publisher's "
                      f"own right (`--include-restricted`): {', '.join(clearance.included_restricted)}."]
    return "\n".join(lines) + "\n"
