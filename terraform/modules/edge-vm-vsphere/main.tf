# An edge agent VM on VMware vSphere: a linked or full clone of a hardened
# template, configured on first boot by cloud-init through the VMware
# GuestInfo data source (guestinfo.userdata / guestinfo.metadata).

data "vsphere_datacenter" "dc" {
  name = var.datacenter
}

data "vsphere_compute_cluster" "cluster" {
  name          = var.cluster
  datacenter_id = data.vsphere_datacenter.dc.id
}

data "vsphere_datastore" "datastore" {
  name          = var.datastore
  datacenter_id = data.vsphere_datacenter.dc.id
}

data "vsphere_network" "network" {
  name          = var.network
  datacenter_id = data.vsphere_datacenter.dc.id
}

data "vsphere_virtual_machine" "template" {
  name          = var.template
  datacenter_id = data.vsphere_datacenter.dc.id
}

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

resource "vsphere_virtual_machine" "edge" {
  name             = var.name
  folder           = var.folder
  resource_pool_id = data.vsphere_compute_cluster.cluster.resource_pool_id
  datastore_id     = data.vsphere_datastore.datastore.id

  num_cpus  = var.cpus
  memory    = var.memory_mb
  guest_id  = data.vsphere_virtual_machine.template.guest_id
  firmware  = data.vsphere_virtual_machine.template.firmware
  scsi_type = data.vsphere_virtual_machine.template.scsi_type

  # Hardening: UEFI secure boot, no hot-plug, disk UUIDs for udev.
  efi_secure_boot_enabled = true
  cpu_hot_add_enabled     = false
  memory_hot_add_enabled  = false
  enable_disk_uuid        = true

  network_interface {
    network_id   = data.vsphere_network.network.id
    adapter_type = data.vsphere_virtual_machine.template.network_interface_types[0]
  }

  disk {
    label            = "disk0"
    size             = max(var.disk_gb, data.vsphere_virtual_machine.template.disks[0].size)
    thin_provisioned = data.vsphere_virtual_machine.template.disks[0].thin_provisioned
  }

  clone {
    template_uuid = data.vsphere_virtual_machine.template.id
  }

  extra_config = {
    "guestinfo.metadata"          = base64encode(module.cloud_init.meta_data)
    "guestinfo.metadata.encoding" = "base64"
    "guestinfo.userdata"          = base64gzip(module.cloud_init.user_data)
    "guestinfo.userdata.encoding" = "gzip+base64"
    # Keep the guest from reading host information and from copy/paste
    # through the console (CIS VMware benchmark).
    "tools.guestlib.enableHostInfo" = "FALSE"
    "isolation.tools.copy.disable"  = "TRUE"
    "isolation.tools.paste.disable" = "TRUE"
  }

  lifecycle {
    # cloud-init runs once; later changes to its data would only recreate
    # the guestinfo keys, not reconfigure the agent. Rotate certificates as in
    # docs/DEPLOYMENT.md instead.
    ignore_changes = [extra_config, clone[0].template_uuid]
  }
}
