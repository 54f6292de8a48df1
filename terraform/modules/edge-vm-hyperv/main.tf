# An edge agent VM on Microsoft Hyper-V: a copy of a hardened generation-2
# template disk, with UEFI secure boot, configured on first boot by
# cloud-init from a NoCloud seed ISO (volume label CIDATA) that this module
# builds and uploads to the host.

module "cloud_init" {
  source = "../edge-cloud-init"

  hostname            = var.name
  tenant              = var.tenant
  agent_id            = var.agent_id
  aggregator_url      = var.aggregator_url
  proxy_url           = var.proxy_url
  listen_address      = var.listen_address
  buffer_capacity     = var.buffer_capacity
  deb_url             = var.deb_url
  deb_sha256          = var.deb_sha256
  ca_pem              = var.ca_pem
  agent_cert_pem      = var.agent_cert_pem
  agent_key_pem       = var.agent_key_pem
  ssh_authorized_keys = var.ssh_authorized_keys
  ntp_servers         = var.ntp_servers
}

data "archive_file" "seed" {
  type        = "zip"
  output_path = "${var.seed_zip_dir}/${var.name}-cidata.zip"

  source {
    filename = "meta-data"
    content  = module.cloud_init.meta_data
  }

  source {
    filename = "user-data"
    content  = module.cloud_init.user_data
  }
}

resource "hyperv_iso_image" "seed" {
  volume_name               = "CIDATA"
  source_zip_file_path      = data.archive_file.seed.output_path
  source_zip_file_path_hash = data.archive_file.seed.output_sha256
  destination_iso_file_path = "${var.vm_dir}\\${var.name}-cidata.iso"
  iso_media_type            = "cdrom"
  iso_file_system_type      = "iso9660|joliet"
}

resource "hyperv_vhd" "system" {
  path   = "${var.vm_dir}\\${var.name}.vhdx"
  source = var.template_vhdx
}

resource "hyperv_machine_instance" "edge" {
  name                   = var.name
  path                   = var.vm_dir
  generation             = 2
  processor_count        = var.cpus
  static_memory          = true
  memory_startup_bytes   = var.memory_mb * 1024 * 1024
  automatic_start_action = "Start"
  automatic_stop_action  = "ShutDown"
  # Checkpoints of a running agent would roll its SQLite buffer back to an
  # older state on restore: records acknowledged since would be sent again
  # (harmless) or lost (not). Back up the VM with production (VSS) backups.
  checkpoint_type = "Disabled"
  state           = "Running"

  vm_firmware {
    enable_secure_boot   = "On"
    secure_boot_template = "MicrosoftUEFICertificateAuthority"
  }

  integration_services = {
    "Guest Service Interface" = false
    "Heartbeat"               = true
    "Key-Value Pair Exchange" = true
    "Shutdown"                = true
    "Time Synchronization"    = true
    "VSS"                     = true
  }

  network_adaptors {
    name         = "lan"
    switch_name  = var.switch_name
    vlan_access  = var.vlan_id != null
    vlan_id      = var.vlan_id != null ? var.vlan_id : 0
    dhcp_guard   = "On"
    router_guard = "On"
  }

  hard_disk_drives {
    controller_type     = "Scsi"
    controller_number   = 0
    controller_location = 0
    path                = hyperv_vhd.system.path
  }

  dvd_drives {
    controller_number   = 0
    controller_location = 1
    path                = hyperv_iso_image.seed.destination_iso_file_path
  }
}
