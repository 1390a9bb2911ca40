from koff.export.exporter import ExportError, export_run
from koff.formats.backbone import BackboneError, load_backbone, read_backbone_meta
from koff.formats.run import RunFolderError, load_run

__all__ = ["BackboneError", "ExportError", "RunFolderError", "export_run", "load_backbone", "load_run", "read_backbone_meta"]
