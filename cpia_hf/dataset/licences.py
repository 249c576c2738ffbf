"""What each source licence allows when a dataset folder is published, and the Hub metadata it asks for.

One table, `POLICIES`, keyed by the catalog's licence strings. A licence that is not in it (and "unknown")
is treated as forbidding redistribution: `cpia push` refuses such subsets unless they are named in
`--include-restricted`. Licences with terms (non-commercial use, data-use policies) make the pushed card
gated: the Hub asks every user to accept the terms before the files can be downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass


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


def restricted_subsets(licences: dict[str, str]) -> dict[str, str]:
    """Subset -> licence of the subsets whose licence is unknown or forbids redistribution."""
    return {subset: lic for subset, lic in sorted(licences.items()) if not policy(lic).redistribute}


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


def licence_file(licences: dict[str, str], homepages: dict[str, str]) -> str:
    """LICENSES.md: one row per included subset with its licence, the licence link and the source's homepage."""
    lines = ["# Licences of the CPIA sources", "",
             "Every image keeps the licence of its source dataset (column `license`). Using CPIA means "
             "accepting each source's terms.", "", "| subset | licence | licence text | source |", "|---|---|---|---|"]
    for subset, lic in sorted(licences.items()):
        link = policy(lic).link or ""
        lines.append(f"| {subset} | {lic} | {link} | {homepages.get(subset, 'unknown')} |")
    return "\n".join(lines) + "\n"
