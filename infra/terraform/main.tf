# The bare-metal lab: machines that already exist (bare metal has no cloud API), reached
# over SSH, provisioned by the project's own Ansible playbooks (infra/ansible/) into one
# Ray cluster. Only Terraform's built-in resource (terraform_data) and provisioners are
# used, so `terraform init` downloads nothing and the configuration applies offline.
#
#   terraform init && terraform apply -var-file=lab.tfvars     (or: remed lab up lab.yaml)
#
# Per host: `install` (the project or the wheels; every host at once), `capabilities`
# (`remed doctor` there, and a role it cannot fill refused), and its Ray node (`ray_head`,
# then `ray_worker`: a worker joins the head). A host is provisioned again when the shipped project, the wheelhouse, its roles,
# its address or the head changes. `terraform destroy` stops Ray on every host, removes its
# services and what the wheels install put there.

terraform {
  required_version = ">= 1.4" # terraform_data
}

locals {
  project_dir = abspath(var.project_dir != "" ? var.project_dir : "${path.module}/../..")
  ansible_dir = "${local.project_dir}/infra/ansible"
  facts_dir   = abspath(var.facts_dir != "" ? var.facts_dir : "${path.root}/.lab-facts")

  # What is shipped to the hosts: the code and the files of the project (no caches, no
  # virtualenv), so a `git pull` that changes nothing shipped re-provisions nothing.
  shipped = sort(concat(
    flatten([for d in ["e2e_reme", "simulators", "cluster", "train", "serve", "vm_images", "infra/ansible"] :
    tolist(fileset(local.project_dir, "${d}/**/*.{py,yaml,yml,j2,txt,cfg,json,service,sh,md}"))]),
    tolist(fileset(local.project_dir, "vm_images/files/**")),
    tolist(fileset(local.project_dir, "{pyproject.toml,Makefile}")),
  ))
  project_hash = sha256(join("", [for f in local.shipped : filesha256("${local.project_dir}/${f}")]))
  wheels_hash  = var.install == "wheels" ? filesha256("${var.wheelhouse}/SHA256SUMS") : ""

  head_name = one([for name, h in var.hosts : name if contains(h.roles, "head")])
  head      = var.hosts[local.head_name]

  # Everything a host's playbooks need, kept in each resource's `input` too: a destroy
  # provisioner may only read its own resource.
  spec = { for name, h in var.hosts : name => {
    name         = name
    address      = h.address
    roles        = h.roles
    user         = coalesce(h.user, var.ssh_user)
    private_key  = pathexpand(coalesce(h.private_key, var.ssh_private_key))
    port         = h.port
    ray_args     = h.ray_args
    head_address = local.head.address
    ray_port     = var.ray_port
    dashboard    = var.dashboard_host
    install      = var.install
    install_dir  = var.install_dir
    wheelhouse   = var.install == "wheels" ? abspath(var.wheelhouse) : ""
    project_dir  = local.project_dir
    facts_dir    = local.facts_dir
    ansible_dir  = local.ansible_dir
    playbook_cmd = var.ansible_playbook
    ssh_args     = var.ssh_extra_args
  } }
  workers = { for name, s in local.spec : name => s if name != local.head_name }
}

resource "terraform_data" "install" {
  for_each = local.spec

  triggers_replace = {
    project = local.project_hash
    wheels  = local.wheels_hash
    roles   = join(",", each.value.roles)
    address = each.value.address
    install = each.value.install
  }
  input = each.value

  # Terraform's own SSH first: an unreachable host or a refused key fails here, naming the host.
  connection {
    type        = "ssh"
    host        = self.input.address
    port        = self.input.port
    user        = self.input.user
    private_key = file(self.input.private_key)
    timeout     = "30s"
  }
  provisioner "remote-exec" {
    inline = ["command -v python3 >/dev/null || { echo 'this host has no python3: install it (apt-get install python3)' >&2; exit 1; }"]
  }

  provisioner "local-exec" {
    command     = "${self.input.playbook_cmd} -i '${self.input.address},' '${self.input.ansible_dir}/install.yml' -e \"$LAB_VARS\""
    environment = { LAB_VARS = jsonencode({ lab = self.input }), ANSIBLE_NOCOLOR = "1", ANSIBLE_PIPELINING = "1" }
  }

  provisioner "local-exec" {
    when        = destroy
    command     = "${self.input.playbook_cmd} -i '${self.input.address},' '${self.input.ansible_dir}/uninstall.yml' -e \"$LAB_VARS\""
    environment = { LAB_VARS = jsonencode({ lab = self.input }), ANSIBLE_NOCOLOR = "1", ANSIBLE_PIPELINING = "1" }
  }
}

# What the host can do, and whether it can fill its roles: a resource of its own, so that a
# refused role leaves the install resource intact (Terraform runs no destroy provisioner
# for a resource whose creation failed) and `terraform destroy` still cleans the host.
resource "terraform_data" "capabilities" {
  for_each = local.spec

  triggers_replace = { install = terraform_data.install[each.key].id }
  input            = each.value

  provisioner "local-exec" {
    command     = "${self.input.playbook_cmd} -i '${self.input.address},' '${self.input.ansible_dir}/check.yml' -e \"$LAB_VARS\""
    environment = { LAB_VARS = jsonencode({ lab = self.input }), ANSIBLE_NOCOLOR = "1", ANSIBLE_PIPELINING = "1" }
  }
}

resource "terraform_data" "ray_head" {
  for_each = { (local.head_name) = local.spec[local.head_name] }

  triggers_replace = {
    checked = terraform_data.capabilities[each.key].id
    args    = each.value.ray_args
    port    = each.value.ray_port
  }
  input = each.value

  provisioner "local-exec" {
    command     = "${self.input.playbook_cmd} -i '${self.input.address},' '${self.input.ansible_dir}/ray.yml' -e \"$LAB_VARS\""
    environment = { LAB_VARS = jsonencode({ lab = self.input }), ANSIBLE_NOCOLOR = "1", ANSIBLE_PIPELINING = "1" }
  }

  provisioner "local-exec" {
    when        = destroy
    command     = "${self.input.playbook_cmd} -i '${self.input.address},' '${self.input.ansible_dir}/ray-down.yml' -e \"$LAB_VARS\""
    environment = { LAB_VARS = jsonencode({ lab = self.input }), ANSIBLE_NOCOLOR = "1", ANSIBLE_PIPELINING = "1" }
  }
}

resource "terraform_data" "ray_worker" {
  for_each = local.workers

  triggers_replace = {
    checked = terraform_data.capabilities[each.key].id
    head    = terraform_data.ray_head[local.head_name].id
    args    = each.value.ray_args
  }
  input = each.value

  provisioner "local-exec" {
    command     = "${self.input.playbook_cmd} -i '${self.input.address},' '${self.input.ansible_dir}/ray.yml' -e \"$LAB_VARS\""
    environment = { LAB_VARS = jsonencode({ lab = self.input }), ANSIBLE_NOCOLOR = "1", ANSIBLE_PIPELINING = "1" }
  }

  provisioner "local-exec" {
    when        = destroy
    command     = "${self.input.playbook_cmd} -i '${self.input.address},' '${self.input.ansible_dir}/ray-down.yml' -e \"$LAB_VARS\""
    environment = { LAB_VARS = jsonencode({ lab = self.input }), ANSIBLE_NOCOLOR = "1", ANSIBLE_PIPELINING = "1" }
  }
}
