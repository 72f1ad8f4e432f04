# Packer template: a Debian 12 AMI with credlock installed and enabled.
#
#   cargo build --release                     # or cross-build for arm64
#   packer init ami/credlock.pkr.hcl
#   packer build -var region=eu-west-1 ami/credlock.pkr.hcl
#
# Needs Packer >= 1.7 with the amazon plugin >= 1.2 (metadata_options, imds_support). The build
# runs ami/provision.sh with --no-start: the firewall rules and the proxy first run on instances
# launched from the image, never on the build instance (whose IMDS Packer and cloud-init use).
# Launch settings for the resulting AMI: ami/launch-settings.md.

packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}

variable "region" {
  type        = string
  description = "Region to build in (the AMI is registered there)."
  default     = "us-east-1"
}

variable "arch" {
  type        = string
  description = "amd64 or arm64; must match the credlock binary."
  default     = "amd64"
  validation {
    condition     = contains(["amd64", "arm64"], var.arch)
    error_message = "The arch must be amd64 or arm64."
  }
}

variable "instance_type" {
  type        = string
  description = "Build instance type (t3.small for amd64, t4g.small for arm64)."
  default     = "t3.small"
}

variable "source_dir" {
  type        = string
  description = "The credlock checkout (systemd/, ami/, policy-templates/); empty: this template's parent directory."
  default     = ""
}

variable "binary" {
  type        = string
  description = "The credlock executable for var.arch (a release build); empty: SOURCE/target/release/credlock."
  default     = ""
}

variable "ami_name_prefix" {
  type    = string
  default = "credlock-debian-12"
}

variable "subnet_id" {
  type        = string
  description = "Subnet for the build instance (empty: the default VPC)."
  default     = ""
}

variable "encrypt_boot" {
  type    = bool
  default = true
}

locals {
  timestamp  = regex_replace(timestamp(), "[- TZ:]", "")
  upload     = "/tmp/credlock-src"
  source_dir = var.source_dir == "" ? "${path.root}/.." : var.source_dir
  binary     = var.binary == "" ? "${local.source_dir}/target/release/credlock" : var.binary
}

source "amazon-ebs" "credlock" {
  region          = var.region
  instance_type   = var.instance_type
  subnet_id       = var.subnet_id == "" ? null : var.subnet_id
  ami_name        = "${var.ami_name_prefix}-${var.arch}-${local.timestamp}"
  ami_description = "Debian 12 with credlock (EC2 metadata proxy locking role credentials to the instance's network)"
  encrypt_boot    = var.encrypt_boot
  ena_support     = true
  ssh_username    = "admin"

  # Official Debian AMIs (account 136693071363, https://wiki.debian.org/Cloud/AmazonEC2Image).
  source_ami_filter {
    filters = {
      name                = "debian-12-${var.arch}-*"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"]
    most_recent = true
  }

  # The build instance: IMDSv2 only, PUT responses never leave the instance (hop limit 1),
  # exactly the settings recommended for instances launched from this AMI.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  # The AMI itself: instances launched from it default to HttpTokens=required. (AWS then sets
  # the hop limit to 2; set 1 in the launch template, see launch-settings.md.)
  imds_support = "v2.0"

  tags = {
    Name        = "${var.ami_name_prefix}-${var.arch}"
    Application = "credlock"
    BuildTime   = local.timestamp
  }
  run_tags = {
    Name = "packer-credlock-build"
  }
}

build {
  sources = ["source.amazon-ebs.credlock"]

  # Dependencies: nftables (the firewall backend), CA certificates (STS/EC2 over HTTPS).
  provisioner "shell" {
    execute_command = "sudo -S env {{ .Vars }} bash '{{ .Path }}'"
    inline = [
      "set -eu",
      "if command -v cloud-init >/dev/null; then cloud-init status --wait >/dev/null || true; fi",
      "export DEBIAN_FRONTEND=noninteractive",
      "apt-get update -q",
      "apt-get install -y -q nftables ca-certificates curl",
      "install -d -m 0755 ${local.upload} ${local.upload}/systemd ${local.upload}/ami ${local.upload}/policy-templates",
      "chown -R admin: ${local.upload}",
    ]
  }

  provisioner "file" {
    source      = local.binary
    destination = "${local.upload}/credlock"
  }

  provisioner "file" {
    source      = "${local.source_dir}/systemd/"
    destination = "${local.upload}/systemd"
  }

  provisioner "file" {
    source      = "${local.source_dir}/policy-templates/"
    destination = "${local.upload}/policy-templates"
  }

  provisioner "file" {
    sources     = ["${local.source_dir}/ami/provision.sh", "${local.source_dir}/ami/README.md", "${local.source_dir}/ami/launch-settings.md"]
    destination = "${local.upload}/ami/"
  }

  # Install and enable (not start): user credlock, /usr/bin/credlock, the firewall script and its
  # defaults, the units, /etc/credlock/credlock.toml, the policy templates.
  provisioner "shell" {
    execute_command = "sudo -S env {{ .Vars }} bash '{{ .Path }}'"
    inline = [
      "set -eu",
      "chmod 0755 ${local.upload}/credlock ${local.upload}/systemd/credlock-firewall ${local.upload}/ami/provision.sh",
      "${local.upload}/ami/provision.sh install --no-start --source-dir ${local.upload} --binary ${local.upload}/credlock",
    ]
  }

  # Validate what the image will boot with, then remove the upload and per-instance state.
  provisioner "shell" {
    execute_command = "sudo -S env {{ .Vars }} bash '{{ .Path }}'"
    inline = [
      "set -eu",
      "id credlock",
      "test \"$(systemctl is-enabled credlock-firewall.service)\" = enabled",
      "test \"$(systemctl is-enabled credlock.service)\" = enabled",
      "systemd-analyze verify credlock-firewall.service credlock.service",
      "/usr/bin/credlock check-config --config /etc/credlock/credlock.toml",
      "/usr/libexec/credlock/credlock-firewall render >/dev/null",
      "systemd-analyze security credlock.service --no-pager | tail -n 1",
      "rm -rf ${local.upload}",
      "if command -v cloud-init >/dev/null; then cloud-init clean --logs; fi",
    ]
  }

  post-processor "manifest" {
    output     = "packer-manifest.json"
    strip_path = true
  }
}
