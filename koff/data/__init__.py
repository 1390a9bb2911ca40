from koff.data.blocks import DomainData, load_domain, load_domains, load_heldout, load_recorded_domain, pack_tokens, split_blocks
from koff.data.sources import (
    DomainDataError,
    DomainSpec,
    bundled_names,
    parse_domain,
    parse_domains,
    read_documents,
    validate_domain_name,
)

__all__ = [
    "DomainData",
    "DomainDataError",
    "DomainSpec",
    "bundled_names",
    "load_domain",
    "load_domains",
    "load_heldout",
    "load_recorded_domain",
    "pack_tokens",
    "parse_domain",
    "parse_domains",
    "read_documents",
    "split_blocks",
    "validate_domain_name",
]
