"""moe-lab's submitit launchers as Hydra plugins (Hydra builds a launcher only from a class in the `hydra_plugins`
package); what they do is in moe_lab/cli/launchers.py, and conf/hydra/launcher/{parallel,slurm}.yaml name them."""

try:
    from moe_lab.cli.launchers import FreshFolderSubmititLauncher
except ImportError:  # hydra-submitit-launcher is not installed (pip install 'moe-lab[launchers]'): no launchers here
    FreshFolderSubmititLauncher = None

if FreshFolderSubmititLauncher is not None:

    class LocalLauncher(FreshFolderSubmititLauncher):
        """Every job of a sweep at once on this host (submitit's local executor)."""

        _EXECUTOR = "local"

    class SlurmLauncher(FreshFolderSubmititLauncher):
        """Every job of a sweep as a SLURM job."""

        _EXECUTOR = "slurm"
