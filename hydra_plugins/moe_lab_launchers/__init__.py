"""moe-lab's launchers as Hydra plugins (Hydra builds a launcher only from a class in the `hydra_plugins` package);
what they do is in moe_lab/cli/launchers.py, submitit_launcher.py and ray_launcher.py, and
conf/hydra/launcher/{parallel,slurm,ray}.yaml name them. A launcher whose plugin is not installed is not defined
here (pip install 'moe-lab[launchers]')."""

try:
    from moe_lab.cli.submitit_launcher import FreshFolderSubmititLauncher
except ImportError:  # hydra-submitit-launcher is not installed
    FreshFolderSubmititLauncher = None
try:
    from moe_lab.cli.ray_launcher import ReportingRayLauncher
except ImportError:  # hydra-ray-launcher is not installed
    ReportingRayLauncher = None

if FreshFolderSubmititLauncher is not None:

    class LocalLauncher(FreshFolderSubmititLauncher):
        """Every job of a sweep at once on this host (submitit's local executor)."""

        _EXECUTOR = "local"

    class SlurmLauncher(FreshFolderSubmititLauncher):
        """Every job of a sweep as a SLURM job."""

        _EXECUTOR = "slurm"


if ReportingRayLauncher is not None:

    class RayLauncher(ReportingRayLauncher):
        """Every job of a sweep as a Ray task."""
