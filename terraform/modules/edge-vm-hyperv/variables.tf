# --- Where the VM goes -------------------------------------------------------------

variable "vm_dir" {
  description = "Directory on the Hyper-V host for the VM's files (disk, seed ISO), e.g. D:\\Hyper-V\\dcs-edge-01."
  type        = string
}

variable "template_vhdx" {
  description = "Path on the Hyper-V host of the hardened template disk to copy: Debian 12 or Ubuntu 22.04/24.04, generation 2, with cloud-init (NoCloud), curl and the Hyper-V integration daemons."
  type        = string
}

variable "switch_name" {
  description = "Virtual switch the VM is attached to. It needs outbound TCP 8443 to the aggregator (or to the proxy)."
  type        = string
}

variable "vlan_id" {
  description = "Access VLAN of the VM's network adapter; null: untagged."
  type        = number
  default     = null
}

variable "seed_zip_dir" {
  description = "Local directory where the cloud-init seed is zipped before upload. The zip holds the agent's private key: keep the directory out of version control and off shared disks."
  type        = string
}

# --- The VM ------------------------------------------------------------------------

variable "name" {
  description = "VM and host name."
  type        = string
}

variable "cpus" {
  description = "Virtual processors."
  type        = number
  default     = 2
}

variable "memory_mb" {
  description = "Static memory in MiB."
  type        = number
  default     = 2048
}

# --- The agent (passed to edge-cloud-init) ------------------------------------------

variable "tenant" {
  description = "Tenant id on the agent's certificate."
  type        = string
}

variable "agent_id" {
  description = "Agent id on the agent's certificate."
  type        = string
}

variable "aggregator_url" {
  description = "https:// URL of the aggregator."
  type        = string
}

variable "proxy_url" {
  description = "Outbound HTTP proxy, or null."
  type        = string
  default     = null
}

variable "listen_address" {
  description = "Address the agent accepts records on."
  type        = string
  default     = "127.0.0.1:8780"
}

variable "buffer_capacity" {
  description = "The agent's buffer.capacity."
  type        = string
  default     = "1GiB"
}

variable "deb_url" {
  description = "URL of the dcs-edge .deb."
  type        = string
}

variable "deb_sha256" {
  description = "SHA-256 of the .deb."
  type        = string
}

variable "ca_pem" {
  description = "The DCS CA certificate."
  type        = string
}

variable "agent_cert_pem" {
  description = "The agent's certificate."
  type        = string
}

variable "agent_key_pem" {
  description = "The agent's private key."
  type        = string
  sensitive   = true
}

variable "ssh_authorized_keys" {
  description = "SSH public keys for the template's default user."
  type        = list(string)
  default     = []
}

variable "ntp_servers" {
  description = "NTP servers; empty: the template's."
  type        = list(string)
  default     = []
}
