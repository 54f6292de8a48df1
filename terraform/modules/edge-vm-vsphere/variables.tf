# --- Where the VM goes -------------------------------------------------------------

variable "datacenter" {
  description = "vSphere datacenter."
  type        = string
}

variable "cluster" {
  description = "Compute cluster whose root resource pool runs the VM."
  type        = string
}

variable "datastore" {
  description = "Datastore for the VM's disk. The agent's buffer lives on it: prefer one with battery-backed or flash storage."
  type        = string
}

variable "network" {
  description = "Port group the VM is attached to. It needs outbound TCP 8443 to the aggregator (or to the proxy)."
  type        = string
}

variable "folder" {
  description = "VM folder, relative to the datacenter. Null: the datacenter's root."
  type        = string
  default     = null
}

variable "template" {
  description = "The hardened template to clone: Debian 12 or Ubuntu 22.04/24.04 with cloud-init (VMware GuestInfo data source), curl and VMware Tools/open-vm-tools."
  type        = string
}

# --- The VM ------------------------------------------------------------------------

variable "name" {
  description = "VM and host name."
  type        = string
}

variable "cpus" {
  description = "vCPUs. 2 covers about 20 000 records/s (docs/DEPLOYMENT.md, sizing)."
  type        = number
  default     = 2
}

variable "memory_mb" {
  description = "Memory in MiB. The agent itself stays under 100 MB."
  type        = number
  default     = 2048
}

variable "disk_gb" {
  description = "System disk in GiB, at least the template's. Leave room for the buffer: buffer_capacity plus 20 %."
  type        = number
  default     = 40
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
