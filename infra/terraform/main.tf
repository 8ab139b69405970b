# The bare-metal lab: machines that already exist (bare metal has no cloud API), reached
# over SSH. Terraform tracks which host has been set up from which revision of the
# project and re-runs the setup when either changes.
#
#   terraform init && terraform apply -var-file=lab.tfvars
#
# Each host gets the project under var.install_dir and runs `make setup image`: apt
# packages, the virtualenv, libvirtd, and the guest image (cached by its recipe hash).
# Sandbox hosts advertise themselves as such in outputs; the Ray fleet (cluster/) uses
# that role to place one sandbox-owning actor per host.

terraform {
  required_version = ">= 1.3"
  required_providers {
    null    = { source = "hashicorp/null", version = ">= 3.2" }
    archive = { source = "hashicorp/archive", version = ">= 2.4" }
  }
}

data "archive_file" "project" {
  type        = "tar.gz"
  source_dir  = "${path.module}/../.."
  output_path = "${path.module}/.project.tar.gz"
  excludes    = [".venv", ".git", "infra/terraform/.terraform", "infra/terraform/.project.tar.gz", "bench/results"]
}

resource "null_resource" "host" {
  for_each = var.hosts

  triggers = {
    project = data.archive_file.project.output_sha
    role    = each.value.role
  }

  connection {
    type        = "ssh"
    host        = each.value.address
    user        = var.ssh_user
    private_key = file(var.ssh_private_key)
  }

  provisioner "file" {
    source      = data.archive_file.project.output_path
    destination = "/tmp/e2e-reme.tar.gz"
  }

  provisioner "remote-exec" {
    inline = [
      "set -e",
      "sudo mkdir -p ${var.install_dir}",
      "sudo tar -xzf /tmp/e2e-reme.tar.gz -C ${var.install_dir}",
      "sudo make -C ${var.install_dir} setup",
      each.value.role == "sandbox_host" ? "sudo make -C ${var.install_dir} image" : "true",
      "sudo ${var.install_dir}/.venv/bin/remed doctor --json > /tmp/remed-doctor.json",
    ]
  }
}
