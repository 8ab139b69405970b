variable "hosts" {
  description = <<-EOT
    The lab's machines by name. Each is reached over SSH at `address` (also the address
    the other hosts use to reach it) and has roles:
      head     runs the Ray head (exactly one host)
      sandbox  a sandbox host: the guest image, nspawn/libvirt sandboxes, the Ray resource
               `sandbox_host` (needs root, KVM for libvirt guests, netem for network faults)
      gpu      advertises its GPUs to Ray (training, serving)
    A host with no role is a plain CPU worker. `ray_args` is appended to `ray start`
    (e.g. "--num-cpus=8"); `user`, `private_key` and `port` override the lab-wide SSH settings.
  EOT
  type = map(object({
    address     = string
    roles       = optional(list(string), [])
    user        = optional(string)
    private_key = optional(string)
    port        = optional(number, 22)
    ray_args    = optional(string, "")
  }))
  validation {
    condition     = alltrue([for h in values(var.hosts) : alltrue([for r in h.roles : contains(["head", "sandbox", "gpu"], r)])])
    error_message = "A host's roles are taken from \"head\", \"sandbox\" and \"gpu\"."
  }
  validation {
    condition     = length([for h in values(var.hosts) : h if contains(h.roles, "head")]) == 1
    error_message = "Exactly one host must have the \"head\" role."
  }
}

variable "ssh_user" {
  description = "SSH user on every host (root, or a user with passwordless sudo)."
  type        = string
  default     = "root"
}

variable "ssh_private_key" {
  description = "Path (on the machine running Terraform) of the private key that reaches the hosts."
  type        = string
}

variable "ssh_extra_args" {
  description = "Extra ssh options for Ansible. The default trusts a host's key the first time it is seen."
  type        = string
  default     = "-o StrictHostKeyChecking=accept-new"
}

variable "install" {
  description = <<-EOT
    How the project gets onto a host:
      project  copy the checkout and run `make setup` (apt, the virtualenv with the whole
               stack) and `make image` on sandbox hosts; the hosts need Debian 12 and a
               package mirror
      wheels   install Ray and the project's CLI from `wheelhouse` into a virtualenv, no
               network needed on the host (`remed lab wheels` builds it); no training stack
  EOT
  type        = string
  default     = "project"
  validation {
    condition     = contains(["project", "wheels"], var.install)
    error_message = "install is \"project\" or \"wheels\"."
  }
}

variable "wheelhouse" {
  description = "install = wheels: the directory of wheels on this machine (with a SHA256SUMS file)."
  type        = string
  default     = ""
}

variable "project_dir" {
  description = "The E2E-REME checkout on this machine (default: two levels above this configuration)."
  type        = string
  default     = ""
}

variable "install_dir" {
  description = "Where the project (or its virtualenv) goes on each host."
  type        = string
  default     = "/opt/e2e-reme"
}

variable "ray_port" {
  description = "The Ray head's GCS port."
  type        = number
  default     = 6379
}

variable "dashboard_host" {
  description = "Address the Ray dashboard (and the job server behind `ray job submit`) binds to on the head. Keep 127.0.0.1 and reach it through `ssh -L 8265:127.0.0.1:8265 HEAD`."
  type        = string
  default     = "127.0.0.1"
}

variable "ansible_playbook" {
  description = "The ansible-playbook command on this machine (the project's virtualenv has one)."
  type        = string
  default     = "ansible-playbook"
}

variable "facts_dir" {
  description = "Where each host's `remed doctor --json` is collected on this machine (default: .lab-facts here)."
  type        = string
  default     = ""
}
